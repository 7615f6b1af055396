"""`monet-fast eval`: a benchmark through latent decoding, with interventions and a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_eval(args: argparse.Namespace) -> int:
    from monet_fast.eval.readers import read_benchmark
    from monet_fast.eval.runner import EvalConfig, evaluate
    from monet_fast.model.loading import load_pretrained
    from monet_fast.tasks.judge import OpenAIJudge

    judge = None
    if args.judge_url:
        if not args.judge_model:
            raise ValueError("--judge-url needs --judge-model")
        judge = OpenAIJudge(args.judge_url, args.judge_model)
    cfg = EvalConfig(
        interventions=args.intervention,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        latent_size=args.latent_size,
        seed=args.seed,
        judge=judge,
        latent_mode=args.latent_mode,
    )
    samples = read_benchmark(
        args.bench,
        args.data,
        limit=args.limit,
        load_images=True,
        allow_outside_root=args.allow_outside_root,
    )
    model, processor = load_pretrained(args.model)
    out = Path(args.out)
    report = evaluate(
        model, processor, samples, cfg, out_dir=out, meta={"bench": args.bench, "model": args.model}
    )
    for name, run in report["interventions"].items():
        delta = run.get("delta_vs_baseline")
        extra = "" if name == report["baseline"] or delta is None else f"  Δ {100 * delta:+.1f} pp"
        trig = run.get("trigger") or {}
        if trig:
            extra += f"  fired {100 * trig['rate']:.1f}%"
        print(f"{name:10s} accuracy {100 * run['accuracy']:.1f}% (n={run['n']}){extra}")
    print(f"report: {out / 'report.md'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on a benchmark with latent interventions and diagnostics"
    )
    p.add_argument("--model", required=True, help="model directory (HF layout)")
    p.add_argument(
        "--bench",
        required=True,
        help="vstar | hrbench4k | hrbench8k | mme-realworld-lite | synthetic",
    )
    p.add_argument("--data", required=True, help="local copy of the benchmark (see docs)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept image paths that are absolute or lead out of the data folder (trusted data)",
    )
    p.add_argument("--latent-size", type=int, default=None, help="K (default: model config)")
    p.add_argument(
        "--intervention",
        default="none",
        help="comma-separated: none,zero,constant,noise,shuffle,mask,no-latent",
    )
    p.add_argument(
        "--latent-mode",
        choices=("auto", "off", "force"),
        default="auto",
        help="auto: the model decides when to open a latent block (trigger rate measured); "
        "off: never; force: every answer starts with one",
    )
    p.add_argument("--out", default="runs/eval", help="output directory for the report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint (optional)")
    p.add_argument("--judge-model", default=None)
    p.set_defaults(func=_cmd_eval)
