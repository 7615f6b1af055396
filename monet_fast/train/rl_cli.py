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


def _cmd_rl(args: argparse.Namespace) -> int:
    from monet_fast.train.vlpo import run_from_args

    return run_from_args(args)


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
