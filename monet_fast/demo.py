"""`monet-fast demo`: the whole Monet pipeline on the embedded tiny model, offline, on a CPU.

    synthetic task (written in the Monet-SFT format, read back) -> tiny Qwen2.5-VL + tokenizer
    -> SFT stage 1 -> stage 2 (online teacher: the stage-1 model) -> stage 3 (cached teacher:
    stage-2 latent trajectories) -> a short VLPO run -> eval with every latent intervention
    -> stages 2-3 again with the other `latent.feedback_norm` -> eval with every intervention

Accuracy (with a 95 % bootstrap CI) and the trigger rate are measured after each stage on 256
held-out samples (another seed), by batched latent decoding. Each phase writes its result to
`<out>/<phase>/phase.json` when it finishes, and a rerun skips finished phases (resumable).
`--quick` is a small version for CI. The summary (`demo_summary.py`) adds paired comparisons on
the same held-out items: VLPO − stage 3 and feedback_norm on − off.

The task is the synthetic "find the small object" task with four colours in a fixed option
order (the answer letter names a colour), sized so the tiny model learns it in minutes. The
main pipeline uses feedback_norm "match_embeddings": with "none" the fed-back hidden state is
~60x the input-embedding norm, the 4 latents of a sample are near copies of each other and the
answer ignores their content (noise / shuffle cost 0 points, measured); rescaled to the
embedding norm, replacing the content costs ~50-60 points (see the README for the numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from monet_fast._io import atomic_write_text
from monet_fast.data.synthetic import SyntheticTaskConfig
from monet_fast.demo_summary import (
    DemoReport,
    format_command,
    format_summary,
    intervention_table,
    latent_diagnostics,
    paired_models,
    read_report,
)
from monet_fast.eval.report import to_jsonable
from monet_fast.model.feedback import FEEDBACK_NORMS, check_feedback_norm

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
    """Sizes of the demo; `quick_config()` gives the CI version."""

    out: Path = Path("runs/demo")
    seed: int = 0
    n_train: int = 1024
    n_eval: int = 256  # held-out samples: a 10-point Δ then has a CI of about ±5 points
    latent_size: int = 4
    stage1_epochs: int = 8
    stage23_epochs: int = 4
    vlpo_steps: int = 8
    max_new_tokens: int = 56
    # latent.feedback_norm of the main pipeline: with "none" the tiny model ignores the latents'
    # content (measured: noise/shuffle cost 0 points), with "match_embeddings" it uses them.
    feedback_norm: str = "match_embeddings"
    # Train stages 2-3 again with the other feedback_norm and compare (paired, same items).
    compare_feedback: bool = True
    stage3_init: str = "stage1"  # stage1 (as the reference) | stage2
    quick: bool = False
    arch: str = "qwen2_5_vl"  # base model of the tiny model (monet_fast.model.arch)

    def __post_init__(self) -> None:
        check_feedback_norm(self.feedback_norm, "feedback_norm")
        if self.stage3_init not in ("stage1", "stage2"):
            raise ValueError(f"stage3_init must be 'stage1' or 'stage2', got {self.stage3_init!r}")

    @property
    def other_feedback_norm(self) -> str:
        return "none" if self.feedback_norm != "none" else "match_embeddings"

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

    def _tiny_init(self) -> Path:
        """The seeded tiny model of `cfg.arch`, saved once (stage 1 starts from it)."""
        from monet_fast.model import save_pretrained, tiny_model

        path = self.out / f"tiny_{self.cfg.arch}"
        if not (path / "config.json").is_file():
            model, processor = tiny_model(
                self.cfg.seed, arch=self.cfg.arch, latent_size=self.cfg.latent_size
            )
            save_pretrained(model, processor, path)
        return path

    def _train_overrides(self, data_path: Path, epochs: int, feedback_norm: str) -> list[str]:
        cfg = self.cfg
        return [
            "data.kind=monet_sft",
            f"data.path={data_path}",
            f"model.latent_size={cfg.latent_size}",
            f"model.feedback_norm={feedback_norm}",
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

    def _evaluate(self, model_dir: Path, out_dir: Path, interventions: list[str]) -> dict:
        """Eval report of `model_dir` on the held-out set (written to out_dir/report.json)."""
        from monet_fast.eval.runner import EvalConfig, evaluate
        from monet_fast.model.loading import load_pretrained

        model, processor = load_pretrained(model_dir)
        cfg = EvalConfig(
            interventions=interventions,
            batch_size=32,
            max_new_tokens=self.cfg.max_new_tokens,
            seed=self.cfg.seed,
            progress=False,
        )
        return evaluate(model, processor, self.held_out, cfg, out_dir=out_dir, meta={"demo": True})

    def _accuracy(self, model_dir: Path, out_dir: Path) -> dict:
        """Held-out accuracy (95 % CI), trigger rate and decode speed of `model_dir`."""
        report = self._evaluate(model_dir, out_dir, ["none"])
        run = report["interventions"]["none"]
        return {
            "accuracy": run["accuracy"],
            "ci": run["ci"],
            "trigger_rate": report["trigger_rate"],
            "eval_tokens_per_s": report["throughput"]["none"]["tokens_per_s"],
            "eval_report": str(out_dir / "report.json"),
        }

    # -- phases --------------------------------------------------------------------------

    def data(self) -> dict:
        from monet_fast.data import read_monet_sft, write_synthetic_dataset

        path = write_synthetic_dataset(
            self.out / "data", self.cfg.n_train, seed=self.cfg.seed, config=DEMO_TASK
        )
        samples = read_monet_sft(path)  # the reader path a real dataset takes
        return {"path": str(path), "n_train": len(samples), "n_choices": DEMO_TASK.n_choices}

    def sft(self, stage: int, data_path: Path, variant: str = "") -> dict:
        """SFT stage `stage`; `variant` "_alt" trains with the other feedback_norm (stages 2-3)."""
        from monet_fast.train import train

        cfg = self.cfg
        feedback = cfg.other_feedback_norm if variant else cfg.feedback_norm
        out = self.out / f"stage{stage}{variant}"
        overrides = self._train_overrides(
            data_path, cfg.stage1_epochs if stage == 1 else cfg.stage23_epochs, feedback
        )
        init = None
        if stage == 1 and cfg.arch == "qwen2_5_vl":
            overrides += [f"model.tiny_seed={cfg.seed}"]  # start from the embedded tiny model
        elif stage == 1:  # another architecture's tiny model, saved once as the init directory
            init = self._tiny_init()
        elif stage == 2:
            init = self.out / "stage1" / "run" / "hf"  # teacher: the same stage-1 model (online)
            overrides += ["teacher.mode=online"]
        else:
            # As the reference intends: initialise from stage 1, distil stage-2 latents (cached).
            start = "stage1" if cfg.stage3_init == "stage1" else f"stage2{variant}"
            init = self.out / start / "run" / "hf"
            overrides += [
                "teacher.mode=cache",
                f"teacher.model={self.out / f'stage2{variant}' / 'run' / 'hf'}",
            ]
        result = train(stage, None, overrides, output=out / "run", init=init)
        return {
            "name": f"stage{stage}{variant}",
            "steps": result.global_step,
            "final_loss": result.losses[-1] if result.losses else None,
            "feedback_norm": feedback,
            **self._accuracy(result.export, out / "eval"),
            "samples_per_s": result.samples_per_s,
            "model": str(result.export),
        }

    def vlpo(self, data_path: Path) -> dict:
        from monet_fast.train.rl_cli import rl

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
        return {
            "name": "vlpo",
            "feedback_norm": cfg.feedback_norm,  # inherited from the stage-3 model's config
            "steps": result.global_step,
            "final_loss": None,
            "reward_first": result.rewards[0] if result.rewards else None,
            "reward_last": result.rewards[-1] if result.rewards else None,
            **self._accuracy(result.export, self.out / "vlpo" / "eval"),
            "model": str(result.export),
        }

    def interventions(self, model_dir: Path, out_dir: Path) -> dict:
        self._evaluate(model_dir, out_dir, INTERVENTIONS)
        return {"report": str(out_dir / "report.json")}

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
        self.phase("eval", lambda: self.interventions(final, self.out / "eval"))
        variant = []
        if cfg.compare_feedback:
            # Stages 2-3 again with the other feedback_norm (same stage 1, data and held-out).
            variant = [
                self.phase(f"stage{s}_alt", lambda s=s: self.sft(s, data_path, "_alt"))
                for s in (2, 3)
            ]
            self.phase(
                "eval_alt",
                lambda: self.interventions(Path(variant[-1]["model"]), self.out / "eval_alt"),
            )
        report = self.summarise(stages, variant)
        self.example(final, self.out / "eval" / "report.json")
        return report

    def example(self, model_dir: Path, eval_report: Path | None = None) -> list[str]:
        """Save a held-out question image and print a `monet-fast generate` command for it.

        The prompt is the task's exact question text: `generate` wraps it in the same chat
        template as training and eval (`render_prompt`), so the model sees what it learned; a
        free-form question is out of distribution for the tiny model. With `eval_report` (the
        model's eval), the first held-out sample it answered correctly is shown (the log says
        so), else the first one. Returns the argv.
        """
        sample, note = self.held_out[0], ""
        if eval_report is not None and eval_report.is_file():
            right = {p["sample_id"] for p in read_report(eval_report)["predictions"]["none"]
                     if p["correct"]}  # fmt: skip
            first = next((s for s in self.held_out if s.sample_id in right), None)
            if first is not None:
                sample = first
                note = f"; the first of the {len(right)} held-out samples it answers correctly"
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
        _log(
            f"try it on a held-out image (expected answer: \\boxed{{{sample.answer}}}, {color}"
            f"{note}):"
        )
        print(format_command(argv), flush=True)
        return argv

    def summarise(self, stages: list[dict], variant: list[dict]) -> DemoReport:
        cfg = self.cfg
        eval_report = read_report(self.out / "eval" / "report.json")
        none = eval_report["interventions"]["none"]
        collapse = none.get("collapse") or {}
        by_name = {s["name"]: s for s in stages + variant}
        comparisons: dict[str, Any] = {}
        if "stage3" in by_name and "vlpo" in by_name:
            comparisons["vlpo_vs_stage3"] = paired_models(
                read_report(by_name["stage3"]["eval_report"]),
                read_report(by_name["vlpo"]["eval_report"]),
                seed=cfg.seed,
            )
        if "stage3_alt" in by_name:
            # a = feedback_norm "none", b = "match_embeddings", whichever the main pipeline used.
            pair = [by_name["stage3"], by_name["stage3_alt"]]
            off, on = sorted(pair, key=lambda s: s["feedback_norm"] != "none")
            comparisons["feedback_norm"] = paired_models(
                read_report(off["eval_report"]), read_report(on["eval_report"]), seed=cfg.seed
            )
            alt_report = read_report(self.out / "eval_alt" / "report.json")
            comparisons["feedback_norm_interventions"] = {
                "mode": cfg.other_feedback_norm,
                "table": intervention_table(alt_report),
                "diagnostics": latent_diagnostics(alt_report),
            }
        report = DemoReport(
            task={
                "n_choices": DEMO_TASK.n_choices,
                "n_eval": cfg.n_eval,
                "n_train": cfg.n_train,
                "chance": 1.0 / DEMO_TASK.n_choices,
                "latent_size": cfg.latent_size,
                "feedback_norm": cfg.feedback_norm,
                "final": stages[-1]["name"],
            },
            stages=[
                {
                    k: s.get(k)
                    for k in (
                        "name",
                        "feedback_norm",
                        "steps",
                        "final_loss",
                        "accuracy",
                        "ci",
                        "trigger_rate",
                    )
                }
                for s in stages + variant
            ],
            interventions=intervention_table(eval_report),
            collapse={
                "mean_pairwise_cosine": collapse.get("mean_cos_across_all"),
                "mean_cosine_within_sample": collapse.get("mean_cos_within"),
                "effective_rank": collapse.get("effective_rank"),
                "centred": collapse.get("centred"),
                "n_latents": collapse.get("n_latents"),
            },
            diagnostics=latent_diagnostics(eval_report),
            comparisons=comparisons,
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
        _write_json(self.out / "report.json", to_jsonable(asdict(report)))
        print(format_summary(report))
        _log(f"report: {self.out / 'report.json'} (plots and tables in {self.out / 'eval'})")
        return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
    cfg.feedback_norm = args.feedback_norm
    cfg.arch = args.arch
    cfg.compare_feedback = not args.no_compare_feedback
    cfg.__post_init__()
    run_demo(cfg)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded tiny model (offline)")
    p.add_argument("--out", type=Path, default=DemoConfig.out, help="output directory (resumable)")
    p.add_argument("--quick", action="store_true", help="a small version (used by CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--arch",
        choices=("qwen2_5_vl", "qwen3_vl"),
        default=DemoConfig.arch,
        help="base-model architecture of the tiny model",
    )
    p.add_argument(
        "--feedback-norm",
        choices=FEEDBACK_NORMS,
        default=DemoConfig.feedback_norm,
        help="latent.feedback_norm of the main pipeline",
    )
    p.add_argument(
        "--no-compare-feedback",
        action="store_true",
        help="skip training stages 2-3 again with the other feedback_norm",
    )
    p.set_defaults(func=_cmd_demo)
