"""Kill test: SIGKILL a tiny stage-1 SFT run at many moments (some inside a checkpoint save),
resume it each time, and check that every logged loss equals the uninterrupted run's exactly
and that the final weights are bit-identical.

    python tools/kill_test.py --kills 20 --out benchmarks/results/kill_test   # PNG + markdown
    python tools/kill_test.py --phases writing,sealed,renamed,random --json    # the `make test` size

The supervisor process imports torch/DeepSpeed/transformers once and forks one child per attempt
(an attempt costs ~0.5 s instead of a fresh interpreter's ~6 s); the children run
`monet_fast.train.sft.train` with `resume` when a committed checkpoint exists, exactly like a job
scheduler restarting `monet-fast train --resume`. Saves are widened with MONET_FAST_CKPT_PAUSE_S
so that a random kill often lands inside one. A targeted kill waits until the save of this
attempt reaches the named phase on disk:
    writing  - `.tmp-<tag>/` exists, no manifest yet (shards being written)
    sealed   - `.tmp-<tag>/manifest.json` written, directory not yet renamed
    renamed  - `<tag>/` in place, `latest` not yet updated
    random   - a uniformly random moment of the attempt
Exit status 0 when every resume succeeded and the curves match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

for _k, _v in {
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_k, _v)
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(_k, None)  # each child is its own one-process run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "stage1.yaml"
PHASES = ("writing", "sealed", "renamed", "random")
KEEP_LAST = 2
_TAG = re.compile(r"^step_(\d+)(?:\.r(\d+))?$")


@dataclass
class Kill:
    attempt: int
    target: str  # the phase asked for
    seconds: float  # after the attempt started
    observed: str  # what the directory showed right after the kill
    resumed_from: int  # the step of the checkpoint the attempt started from (0: fresh)
    last_step: int | None  # the last step this attempt logged (None: none)


@dataclass
class Report:
    steps: int
    save_every: int
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    logged_records: int = 0  # step records of all attempts (redone steps included)
    max_abs_loss_diff: float = 0.0
    weights_equal: bool = False
    seconds: float = 0.0
    reference: list[float] = field(default_factory=list)
    records: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.weights_equal and self.max_abs_loss_diff == 0.0


def _overrides(steps: int, save_every: int) -> list[str]:
    # 8 samples, global batch 2: 4 steps per epoch; epochs cover `steps` so the LR schedule is
    # the same whatever step a run stops at.
    return [
        "data.n=8",
        "model.latent_size=4",
        "logging.progress=false",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=1",
        f"trainer.epochs={-(-steps // 4)}",
        f"trainer.save_every={save_every}",
        f"trainer.keep_last={KEEP_LAST}",
        "trainer.export=false",
        "scheduler.warmup_steps=0",
    ]


def _preload() -> None:
    """Import everything a run imports lazily, so that forked children start warm."""
    import importlib

    for name in (
        "monet_fast.train.sft",
        "monet_fast.model.tiny",
        "monet_fast.model.latent",
        "deepspeed",
        "deepspeed.comm.torch",
        "deepspeed.runtime.engine",
        "deepspeed.runtime.zero.stage_1_and_2",
        "deepspeed.runtime.zero.muon.muon_optimizer",  # imports torch._inductor (~2 s)
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional speed-up only


def _start(out: Path, steps: int, save_every: int, log: Path) -> int:
    """Fork a child that trains `out` to `steps` (resuming when `latest` exists)."""
    resume = (out / "checkpoints" / "latest").is_file()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from monet_fast.train.sft import train

        train(
            1,
            CONFIG,
            _overrides(steps, save_every),
            output=out,
            max_steps=steps,
            resume=resume or None,
        )
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _key(name: str) -> tuple[int, int]:
    m = _TAG.match(name)
    return int(m.group(1)), int(m.group(2) or 0)


def _state(root: Path, since: float) -> str:
    """Which save phase the directory shows, counting only what changed after `since`."""
    if not root.is_dir():
        return "setup"
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    for p in root.glob(".tmp-*"):
        try:
            if (p / "manifest.json").is_file():
                if (p / "manifest.json").stat().st_mtime > since:
                    return "sealed"
                continue  # left by an earlier attempt
            if p.stat().st_ctime > since:
                return "writing"
        except FileNotFoundError:
            pass  # renamed under us
    for p in root.iterdir():
        if _TAG.match(p.name) and (latest is None or _key(p.name) > _key(latest)):
            if p.stat().st_ctime > since:
                return "renamed"
    if any(root.glob(".trash-*")):
        return "pruning"
    tags = [p for p in root.iterdir() if _TAG.match(p.name)]
    if len(tags) > KEEP_LAST and (root / "latest").stat().st_mtime > since:
        return "committed"  # `latest` updated, older checkpoints not yet pruned
    return "training"


def _last_step(out: Path) -> int:
    from monet_fast.train.metrics import read_metrics

    path = out / "metrics.jsonl"
    return max([0] + [r["step"] for r in read_metrics(path)]) if path.is_file() else 0


def _attempt_log(out: Path, offset: int) -> tuple[bool, int | None]:
    """(got past set-up, last step logged) for what an attempt appended to metrics.jsonl after
    byte `offset` (each attempt logs a `start` or `resume` event once set up)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return False, None
    with open(path, "rb") as f:
        f.seek(offset)
        recs = [json.loads(line) for line in f.read().decode().splitlines()]
    started = any(r.get("event") in ("start", "resume") for r in recs)
    steps = [r["step"] for r in recs if "step" in r and "event" not in r]
    return started, (steps[-1] if steps else None)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _train_seconds(out: Path) -> float:
    """The `seconds` of the run's last `end` event (its training time, set-up excluded)."""
    ends = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in ends if r.get("event") == "end"][-1]


def _records(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step record every attempt logged, in file order."""
    recs = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)  # a torn line (a kill inside a write) fails the test here
        if "step" in rec and "event" not in rec:
            recs.append((rec["step"], rec["loss"]))
    return recs


def _final_weights(out: Path) -> dict:
    import torch

    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    state = torch.load(
        root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return state["module"]


def run(
    out: Path,
    *,
    targets: list[str],
    steps: int = 24,
    save_every: int = 2,
    pause_s: float = 0.05,
    seed: int = 0,
    verbose: bool = False,
) -> Report:
    """Reference run, then a run killed once per entry of `targets`, then compare."""
    import torch

    t_all = time.perf_counter()
    _preload()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(steps=steps, save_every=save_every)
    os.environ["MONET_FAST_CKPT_PAUSE_S"] = str(pause_s)  # same saves in both runs

    ref = out / "reference"
    t0 = time.perf_counter()
    pid = _start(ref, steps, save_every, out / "reference.log")
    _, status = os.waitpid(pid, 0)
    t_ref = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        report.failures.append(f"reference run failed; see {out / 'reference.log'}")
        return report
    report.reference = [loss for _, loss in sorted(dict(_records(ref)).items())]
    t_work = _train_seconds(ref)
    t_setup = max(0.0, t_ref - t_work)

    run_dir = out / "killed"
    root = run_dir / "checkpoints"
    queue = list(targets)
    while True:
        report.attempts += 1
        target = queue.pop(0) if queue else None
        start = time.time()
        t0 = time.perf_counter()
        pid = _start(run_dir, steps, save_every, out / "killed.log")
        # A random moment from the second half of set-up to a share of the remaining work
        # that spreads the kills left over the rest of the run (uniform over the whole attempt
        # would finish most of the run within the first few kills).
        work_left = t_work * max(0.0, 1.0 - _last_step(run_dir) / steps)
        share = work_left / (len(queue) + 1)
        deadline = t0 + rng.uniform(0.5 * t_setup, t_setup + share) if target == "random" else None
        offset = _size(run_dir / "metrics.jsonl")
        latest = root / "latest"
        resumed_from = _key(latest.read_text().strip())[0] if latest.is_file() else 0
        killed = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.perf_counter()
            hit = target is not None and (
                now >= deadline if deadline is not None else _state(root, start) == target
            )
            if hit:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                seen = _state(root, start)
                started, last = _attempt_log(run_dir, offset)
                if seen == "training" and not started:
                    seen = "setup"  # this attempt had not begun training yet
                killed = Kill(report.attempts, target, now - t0, seen, resumed_from, last)
                break
            time.sleep(0.002)
        code = os.waitstatus_to_exitcode(status)
        if killed is not None:
            report.kills.append(killed)
            if verbose:
                print(f"kill {len(report.kills)}: {killed}", flush=True)
            continue
        if code != 0:
            report.failures.append(
                f"attempt {report.attempts} exited {code}; see {out / 'killed.log'}"
            )
        elif target is not None:
            report.failures.append(
                f"the run finished before kill {len(report.kills) + 1} ({target}) of "
                f"{len(targets)}; give it more --steps"
            )
        break
    recs = _records(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    report.records = recs
    report.logged_records = len(recs)
    want = dict(enumerate(report.reference, start=1))
    missing = sorted(set(want) - {s for s, _ in recs})
    if missing:
        report.failures.append(f"steps never logged: {missing}")
    report.max_abs_loss_diff = max((abs(loss - want[s]) for s, loss in recs), default=0.0)
    if not report.failures:
        a, b = _final_weights(ref), _final_weights(run_dir)
        report.weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report.seconds = time.perf_counter() - t_all
    return report


def markdown(report: Report) -> str:
    """The report as a markdown table + summary line (the figure's text twin)."""
    during = sum(k.observed not in ("setup", "training") for k in report.kills)
    lines = [
        f"Kill test: {len(report.kills)} SIGKILLs ({during} inside a checkpoint save), "
        f"{report.attempts} attempts, {report.steps} steps (checkpoint every "
        f"{report.save_every}); failed resumes: {len(report.failures)}; "
        f"{report.logged_records} logged step records, max |loss - uninterrupted| = "
        f"{report.max_abs_loss_diff:g}; final weights bit-identical: {report.weights_equal}; "
        f"{report.seconds:.1f} s.",
        "",
        "| kill | target | at (s) | killed while | resumed from step | last step logged |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for i, k in enumerate(report.kills, 1):
        last = "-" if k.last_step is None else k.last_step
        lines.append(
            f"| {i} | {k.target} | {k.seconds:.2f} | {k.observed} | {k.resumed_from} | {last} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> None:
    """Loss per step: the uninterrupted curve, every record of the killed run, the kills."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = range(1, len(report.reference) + 1)
    ax.plot(steps, report.reference, "-", color="#4c72b0", lw=2, label="uninterrupted")
    xs = [s for s, _ in report.records]
    ys = [loss for _, loss in report.records]
    ax.plot(xs, ys, "o", ms=4, mfc="none", color="#dd8452", label="killed + resumed (all records)")
    for k in report.kills:
        inside = k.observed not in ("setup", "training")
        x = k.resumed_from if k.last_step is None else k.last_step
        ax.axvline(x + 0.5, color="#c44e52" if inside else "#999999", lw=0.8, alpha=0.6)
    ax.plot([], [], color="#c44e52", lw=0.8, label="kill inside a save")
    ax.plot([], [], color="#999999", lw=0.8, label="kill elsewhere")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(
        f"{len(report.kills)} SIGKILLs, max |diff| = {report.max_abs_loss_diff:g}", fontsize=10
    )
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="random-moment kills (default 20)")
    ap.add_argument(
        "--phases",
        default=None,
        help=f"comma-separated kill targets from {PHASES} (overrides --kills)",
    )
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.02, help="MONET_FAST_CKPT_PAUSE_S (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="where runs and the figure go")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: --out)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.phases:
        targets = [t.strip() for t in args.phases.split(",") if t.strip()]
        bad = [t for t in targets if t not in PHASES]
        if bad:
            ap.error(f"--phases: unknown {bad}; allowed {list(PHASES)}")
    else:
        targets = ["random"] * args.kills
    out = args.out or Path("kill_test_out")
    work = args.work or out
    report = run(
        work,
        targets=targets,
        steps=args.steps,
        save_every=args.save_every,
        pause_s=args.pause,
        seed=args.seed,
        verbose=not args.json,
    )
    text = markdown(report)
    if args.out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kill_test.md").write_text(text)
        if not report.failures:
            plot(report, out / "kill_test.png")
    if args.json:
        d = asdict(report)
        d.pop("records")
        print(json.dumps({**d, "ok": report.ok}))
    else:
        print(text)
        for f in report.failures:
            print("FAILED:", f)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
