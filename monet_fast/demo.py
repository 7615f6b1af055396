"""`monet-fast demo`: the whole Monet pipeline on the embedded tiny model, offline, on a CPU.

    synthetic task (written in the Monet-SFT format, read back) -> tiny Qwen2.5-VL + tokenizer
    -> SFT stage 1 -> stage 2 (online teacher: the stage-1 model) -> stage 3 (cached teacher:
    stage-2 latent trajectories) -> a short VLPO run -> eval with every latent intervention

Accuracy is measured after each stage on held-out samples (another seed), by batched latent
decoding. Each phase writes its result to `<out>/<phase>/phase.json` when it finishes, and a
rerun skips finished phases (resumable). `--quick` is a small version for CI.

The task is the synthetic "find the small object" task with four colours in a fixed option
order (the answer letter names a colour), sized so the tiny model learns it in minutes (measured
while building it: held-out accuracy about 92 % after stage 3, chance 25 %; with two distractors
per canvas the same budget reached 36 %).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monet_fast._io import atomic_write_text
from monet_fast.data.synthetic import SyntheticTaskConfig

DEMO_TASK = SyntheticTaskConfig(
    colors=("red", "green", "blue", "yellow"),
    n_choices=4,
    shuffle_choices=False,
    # The target alone on a textured canvas: the tiny model must locate it and read its colour
    # (distractors make the task too hard to learn in a few CPU minutes; raise them for a
    # harder run with a larger model).
    n_distractors=0,
    target_size=(12, 16),
)
INTERVENTIONS = ["none", "zero", "constant", "noise", "shuffle", "mask", "no-latent"]


@dataclass
class DemoConfig:
    """Sizes of the demo; `quick()` gives the CI version."""

    out: Path = Path("runs/demo")
    seed: int = 0
    n_train: int = 1024
    n_eval: int = 64
    latent_size: int = 4
    stage1_epochs: int = 8
    stage23_epochs: int = 4
    vlpo_steps: int = 8
    max_new_tokens: int = 56
    quick: bool = False

    @classmethod
    def quick_config(cls, out: Path, seed: int = 0) -> DemoConfig:
        return cls(
            out=out,
            seed=seed,
            n_train=16,
            n_eval=8,
            stage1_epochs=1,
            stage23_epochs=1,
            vlpo_steps=1,
            quick=True,
        )


@dataclass
class DemoReport:
    task: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    interventions: dict = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class Demo:
    """The demo pipeline; each phase is a method whose result is cached in phase.json."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.held_out = None

    # -- plumbing ------------------------------------------------------------------------

    def phase(self, name: str, fn) -> dict:
        marker = self.out / name / "phase.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            _log(f"{name}: done in an earlier run, skipped")
            return result
        _log(f"{name}: running")
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        _write_json(marker, result)
        _log(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "report"))
        return result

    def _train_overrides(self, data_path: Path, epochs: int) -> list[str]:
        cfg = self.cfg
        return [
            "data.kind=monet_sft",
            f"data.path={data_path}",
            f"model.latent_size={cfg.latent_size}",
            f"trainer.epochs={epochs}",
            "trainer.micro_batch_size=8",
            "trainer.grad_accum=1",
            "trainer.save_every=0",
            "scheduler.warmup_steps=10",
            "optim.lr=1.0e-3",
            # Train the observation tags so the model opens an observation after its latent
            # block at inference (the reference leaves that token untrained).
            "loss.observation_tags=true",
            f"seed={cfg.seed}",
            "logging.progress=true",
        ]

    def _accuracy(self, model_dir: Path) -> tuple[float, float]:
        from monet_fast.eval.runner import EvalConfig, evaluate
        from monet_fast.model.loading import load_pretrained

        model, processor = load_pretrained(model_dir)
        cfg = EvalConfig(batch_size=32, max_new_tokens=self.cfg.max_new_tokens, progress=False)
        report = evaluate(model, processor, self.held_out, cfg)
        run = report["interventions"]["none"]
        return run["accuracy"], report["throughput"]["none"]["tokens_per_s"]

    # -- phases --------------------------------------------------------------------------

    def data(self) -> dict:
        from monet_fast.data import read_monet_sft, write_synthetic_dataset

        path = write_synthetic_dataset(
            self.out / "data", self.cfg.n_train, seed=self.cfg.seed, config=DEMO_TASK
        )
        samples = read_monet_sft(path)  # the reader path a real dataset takes
        return {"path": str(path), "n_train": len(samples), "n_choices": DEMO_TASK.n_choices}

    def sft(self, stage: int, data_path: Path) -> dict:
        from monet_fast.train import train

        cfg = self.cfg
        out = self.out / f"stage{stage}"
        overrides = self._train_overrides(
            data_path, cfg.stage1_epochs if stage == 1 else cfg.stage23_epochs
        )
        init = None
        if stage == 1:
            overrides += [f"model.tiny_seed={cfg.seed}"]  # start from the embedded tiny model
        elif stage == 2:
            init = self.out / "stage1" / "run" / "hf"  # teacher: the same stage-1 model (online)
            overrides += ["teacher.mode=online"]
        else:
            # As the reference intends: initialise from stage 1, distil stage-2 latents (cached).
            init = self.out / "stage1" / "run" / "hf"
            overrides += [
                "teacher.mode=cache",
                f"teacher.model={self.out / 'stage2' / 'run' / 'hf'}",
            ]
        result = train(stage, None, overrides, output=out / "run", init=init)
        accuracy, tok_s = self._accuracy(result.export)
        return {
            "name": f"stage{stage}",
            "steps": result.global_step,
            "final_loss": result.losses[-1] if result.losses else None,
            "accuracy": accuracy,
            "samples_per_s": result.samples_per_s,
            "eval_tokens_per_s": tok_s,
            "model": str(result.export),
        }

    def vlpo(self, data_path: Path) -> dict:
        from monet_fast.train.vlpo import rl

        cfg = self.cfg
        overrides = [
            "data.kind=monet_sft",
            f"data.path={data_path}",
            f"model.latent_size={cfg.latent_size}",
            f"rollout.max_new_tokens={cfg.max_new_tokens}",
            # After stage 3 the tiny model solves most prompts: sample hotter than the reference
            # (0.5) so groups disagree, and keep every group with a wrong answer.
            "rollout.temperature=1.0",
            "filter.acc_high=0.99",
            # tiny-model scale (the defaults are the 7B reference values)
            "optim.lr=5.0e-5",
            f"seed={cfg.seed}",
        ]
        # Several optimizer steps per rollout batch (as the reference's 64 / 16): the latent
        # term has no gradient on the first (rollout latents are the policy mean) and acts on
        # the later ones; metrics.jsonl logs each update ("update" lines, latent_*).
        if cfg.quick:
            overrides += [
                "rollout.group_size=2",
                "rollout.prompts_per_step=2",
                "trainer.mini_batch_prompts=1",  # 2 updates per rollout batch
                "trainer.micro_batch_size=4",
                # The quick model answers nothing right yet: without the filter its groups
                # (advantage 0, KL only) still run the update path; no extra rollouts.
                "filter.enabled=false",
                "filter.max_extra_rollouts=0",
            ]
        else:
            overrides += [
                "rollout.prompts_per_step=8",
                "trainer.mini_batch_prompts=1",  # one group per update: up to 8 per batch
                "trainer.micro_batch_size=16",
                "filter.max_extra_rollouts=1",  # at most one more rollout call to fill the step
            ]
        result = rl(
            None,
            overrides,
            output=self.out / "vlpo" / "run",
            max_steps=cfg.vlpo_steps,
            init=self.out / "stage3" / "run" / "hf",
        )
        accuracy, tok_s = self._accuracy(result.export)
        return {
            "name": "vlpo",
            "steps": result.global_step,
            "final_loss": None,
            "reward_first": result.rewards[0] if result.rewards else None,
            "reward_last": result.rewards[-1] if result.rewards else None,
            "accuracy": accuracy,
            "eval_tokens_per_s": tok_s,
            "model": str(result.export),
        }

    def interventions(self, model_dir: Path) -> dict:
        from monet_fast.eval.runner import EvalConfig, evaluate
        from monet_fast.model.loading import load_pretrained

        model, processor = load_pretrained(model_dir)
        cfg = EvalConfig(
            interventions=INTERVENTIONS,
            batch_size=32,
            max_new_tokens=self.cfg.max_new_tokens,
            seed=self.cfg.seed,
            progress=True,
        )
        evaluate(
            model, processor, self.held_out, cfg, out_dir=self.out / "eval", meta={"demo": True}
        )
        return {"report": str(self.out / "eval" / "report.json")}

    # -- the whole run -------------------------------------------------------------------

    def run(self) -> DemoReport:
        from monet_fast.data import make_samples

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "demo_config.json", asdict(cfg))
        # Held-out: another seed of the same task (never trained on).
        self.held_out = make_samples(cfg.n_eval, seed=cfg.seed + 1000, config=DEMO_TASK)
        data = self.phase("data", self.data)
        data_path = Path(data["path"])
        stages = [self.phase(f"stage{s}", lambda s=s: self.sft(s, data_path)) for s in (1, 2, 3)]
        stages.append(self.phase("vlpo", lambda: self.vlpo(data_path)))
        final = Path(stages[-1]["model"])
        self.phase("eval", lambda: self.interventions(final))
        report = self.summarise(stages)
        self.example(final)
        return report

    def example(self, model_dir: Path) -> list[str]:
        """Save a held-out question image and print a `monet-fast generate` command for it.

        The prompt is the task's exact question text: `generate` wraps it in the same chat
        template as training and eval (`render_prompt`), so the model sees what it learned; a
        free-form question is out of distribution for the tiny model. Returns the argv.
        """
        sample = self.held_out[0]
        image = self.out / "example" / "question.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        sample.question_images[0].save(image)
        question = "".join(seg.text for seg in sample.question if seg.kind == "text")
        argv = [
            "generate",
            "--model",
            str(model_dir),
            "--image",
            str(image),
            "--prompt",
            question,
            "--max-new-tokens",
            str(self.cfg.max_new_tokens),
            "--latent-trace",
        ]
        color = sample.meta["target_color"]
        _log(f"try it on a held-out image (expected answer: \\boxed{{{sample.answer}}}, {color}):")
        print(format_command(argv), flush=True)
        return argv

    def summarise(self, stages: list[dict]) -> DemoReport:
        eval_report = json.loads((self.out / "eval" / "report.json").read_text())
        runs = eval_report["interventions"]
        none = runs["none"]
        collapse = none.get("collapse") or {}
        report = DemoReport(
            task={
                "n_choices": DEMO_TASK.n_choices,
                "n_eval": self.cfg.n_eval,
                "n_train": self.cfg.n_train,
                "chance": 1.0 / DEMO_TASK.n_choices,
                "latent_size": self.cfg.latent_size,
            },
            stages=[
                {k: s.get(k) for k in ("name", "steps", "final_loss", "accuracy")} for s in stages
            ],
            interventions={
                **{
                    name: {
                        "accuracy": run["accuracy"],
                        "delta": run.get("delta_vs_baseline") if name != "none" else 0.0,
                        "ci": run.get("delta_ci") if name != "none" else None,
                    }
                    for name, run in runs.items()
                },
                **{
                    name: {"accuracy": None, "delta": None, "ci": None, "skipped": why}
                    for name, why in eval_report.get("skipped_interventions", {}).items()
                },
            },
            collapse={
                "mean_pairwise_cosine": collapse.get("mean_cos_across_all"),
                "mean_cosine_within_sample": collapse.get("mean_cos_within"),
                "effective_rank": collapse.get("effective_rank"),
                "n_latents": collapse.get("n_latents"),
            },
            throughput={
                **{
                    s["name"]: {k: s[k] for k in ("samples_per_s", "eval_tokens_per_s") if k in s}
                    for s in stages
                },
                "eval_tokens_per_s": eval_report.get("throughput", {})
                .get("none", {})
                .get("tokens_per_s"),
            },
        )
        _write_json(self.out / "report.json", _finite(asdict(report)))
        print(format_summary(report))
        _log(f"report: {self.out / 'report.json'} (plots and tables in {self.out / 'eval'})")
        return report


def _finite(obj: Any) -> Any:
    """NaN -> None, so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_summary(report: DemoReport) -> str:
    lines = [
        "",
        f"monet_fast demo — synthetic task, {report.task['n_choices']} choices "
        f"(chance {_pct(report.task['chance'])}), {report.task['n_eval']} held-out samples",
        "",
        "| stage | steps | final loss | held-out accuracy |",
        "|---|---|---|---|",
    ]
    for s in report.stages:
        loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.3f}"
        lines.append(f"| {s['name']} | {s['steps']} | {loss} | {_pct(s['accuracy'])} |")
    lines += ["", "| intervention | accuracy | Δ vs none | 95% CI of Δ |", "|---|---|---|---|"]
    for name, run in report.interventions.items():
        if run.get("skipped"):
            lines.append(f"| {name} | skipped: {run['skipped']} | - | - |")
            continue
        ci = run["ci"]
        ci_s = "-" if not ci or ci[0] is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pp"
        delta = "-" if name == "none" or run["delta"] is None else f"{100 * run['delta']:+.1f} pp"
        lines.append(f"| {name} | {_pct(run['accuracy'])} | {delta} | {ci_s} |")
    c = report.collapse
    cos = c.get("mean_pairwise_cosine")
    rank = c.get("effective_rank")
    lines += [
        "",
        f"latent collapse: mean pairwise cosine {'n/a' if cos is None else f'{cos:.3f}'}, "
        f"effective rank {'n/a' if rank is None else f'{rank:.2f}'} "
        f"over {c.get('n_latents')} latents",
    ]
    return "\n".join(lines)


def format_command(argv: list[str]) -> str:
    """`monet-fast ARGV` as one shell command (the prompt's newlines stay inside its quotes)."""
    return " ".join(["monet-fast", *(shlex.quote(a) for a in argv)])


def run_demo(cfg: DemoConfig) -> DemoReport:
    # The tiny model's matrices are too small for intra-op threads to pay off, and on a busy
    # machine oversubscribed threads spin (measured: 2 threads under load ran a step 30x slower).
    torch.set_num_threads(1)
    return Demo(cfg).run()


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = (
        DemoConfig.quick_config(args.out, seed=args.seed)
        if args.quick
        else DemoConfig(out=args.out, seed=args.seed)
    )
    run_demo(cfg)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded tiny model (offline)")
    p.add_argument("--out", type=Path, default=DemoConfig.out, help="output directory (resumable)")
    p.add_argument("--quick", action="store_true", help="a small version (used by CI)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
