"""`monet-fast rl`: VLPO reinforcement learning from an SFT checkpoint.

    monet-fast rl --config configs/tiny/vlpo.yaml --init runs/tiny/stage3/hf --output runs/tiny/vlpo
    monet-fast rl --config configs/tiny/vlpo.yaml --init runs/tiny/stage3 --output runs/tiny/vlpo \\
        --max-steps 20 rollout.group_size=4 vlpo.kl_coef=0
    monet-fast rl ... --resume                     # continue from the latest checkpoint
    torchrun --nproc_per_node 8 -m monet_fast.train.vlpo --config configs/qwen2_5_vl_7b/vlpo.yaml \\
        --init runs/7b/stage3/hf --output runs/7b/vlpo                                  # multi-GPU

--init takes the SFT model directory (an exported hf/ directory, or the SFT run directory that
holds it). No external service is used unless reward.judge.base_url is set.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recipe imports DeepSpeed-side modules; the CLI parser stays light
    from monet_fast.train.vlpo_config import RLConfig
    from monet_fast.train.vlpo_state import RLResult


def _cmd_rl(args: argparse.Namespace) -> int:
    return run_from_args(args)


def build_rl_config(
    config: str | Path | RLConfig | None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    init: str | Path | None = None,
) -> RLConfig:
    """Config file + overrides + the CLI's common flags (which win over the file)."""
    from monet_fast.train.config_schema import build_run_config
    from monet_fast.train.vlpo_config import RLConfig, load_rl_config

    return build_run_config(
        RLConfig, config, overrides, load_rl_config, output=output, max_steps=max_steps, init=init
    )


def rl(
    config: str | Path | RLConfig | None = None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    resume: str | bool | None = None,
    init: str | Path | None = None,
) -> RLResult:
    """Run VLPO; the Python twin of `monet-fast rl`. resume: True/"latest", a tag or a path."""
    from monet_fast.train.vlpo import VLPORecipe

    cfg = build_rl_config(config, overrides, output=output, max_steps=max_steps, init=init)
    if resume is True:
        resume = "latest"
    return VLPORecipe(cfg, resume=resume or None).run()


def run_from_args(args: argparse.Namespace) -> int:
    """Execute parsed rl arguments; prints a one-line summary on rank 0."""
    from monet_fast.train.recipe_base import run_cli

    def summary(result: RLResult) -> str:
        last = result.rewards[-1] if result.rewards else float("nan")
        return (
            f"VLPO ran to step {result.global_step} in {result.seconds:.1f}s; last reward "
            f"mean {last:.4f}; checkpoint {result.checkpoint}; export {result.export}"
        )

    return run_cli(
        lambda: rl(
            args.config,
            args.overrides,
            output=args.output,
            max_steps=args.max_steps,
            resume=args.resume_from or args.resume,
            init=args.init,
        ),
        summary,
    )


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """The `monet-fast rl` / `python -m monet_fast.train.vlpo` arguments."""
    p.add_argument("--config", help="YAML config, e.g. configs/tiny/vlpo.yaml")
    p.add_argument("--init", help="SFT model directory (hf/ export or the SFT run directory)")
    p.add_argument("--output", help="run directory (checkpoints, metrics, hf export)")
    p.add_argument("--max-steps", type=int, help="stop after this RL step (rollout batch)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )
    p.add_argument(
        "--resume-from", metavar="TAG_OR_DIR", help="continue from this checkpoint tag or directory"
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # `deepspeed` launcher
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. vlpo.kl_coef=0 (after the options)",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m monet_fast.train.vlpo` (what torchrun / deepspeed launch): the `rl` arguments."""
    from monet_fast.train.recipe_base import module_main

    return module_main(
        argv,
        prog="python -m monet_fast.train.vlpo",
        command="rl",
        description=__doc__,
        add_arguments=add_rl_arguments,
        run_from_args=run_from_args,
    )


def register(subparsers) -> None:
    """Add `rl` to the `monet-fast` command line (imports nothing heavy)."""
    p = subparsers.add_parser(
        "rl",
        help="VLPO reinforcement learning (latent GRPO) on DeepSpeed from an SFT checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_rl_arguments(p)
    p.set_defaults(func=_cmd_rl)
