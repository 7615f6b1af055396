"""`monet-fast train`: run one SFT stage (or only build its teacher cache).

    monet-fast train --stage 1 --config configs/tiny/stage1.yaml --output runs/tiny/stage1
    monet-fast train --stage 2 --config configs/tiny/stage2.yaml --output runs/tiny/stage2 \\
        --init runs/tiny/stage1/hf optim.lr=1e-3 trainer.max_steps=20
    monet-fast train --stage 2 ... --resume            # continue from the latest checkpoint
    torchrun --nproc_per_node 8 -m monet_fast.train.sft --stage 1 --config ...   # multi-GPU
    deepspeed --num_gpus 8 --module monet_fast.train.sft --stage 1 --config ...       # same
"""

from __future__ import annotations

import argparse


def _cmd_train(args: argparse.Namespace) -> int:
    from monet_fast.train.sft import run_from_args

    return run_from_args(args)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The `monet-fast train` / `python -m monet_fast.train.sft` arguments."""
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="SFT stage (must match the config)")
    p.add_argument("--config", help="YAML config, e.g. configs/tiny/stage1.yaml")
    p.add_argument("--output", help="run directory (checkpoints, metrics, hf export)")
    p.add_argument("--max-steps", type=int, help="stop after this optimizer step")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )
    p.add_argument(
        "--resume-from", metavar="TAG_OR_DIR", help="continue from this checkpoint tag or directory"
    )
    p.add_argument("--init", help="model directory to start from (tiny configs: tiny model)")
    p.add_argument(
        "--precompute-teacher",
        action="store_true",
        help="only build the teacher cache (teacher.mode=cache) and exit",
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # `deepspeed` launcher
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. optim.lr=1e-4 (keep them together, after the options)",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m monet_fast.train.sft` (what torchrun / deepspeed launch): the `train` arguments."""
    from monet_fast.train.recipe_base import module_main
    from monet_fast.train.sft import run_from_args

    return module_main(
        argv,
        prog="python -m monet_fast.train.sft",
        command="train",
        description=__doc__,
        add_arguments=add_train_arguments,
        run_from_args=run_from_args,
    )


def register(subparsers) -> None:
    """Add `train` to the `monet-fast` command line (imports nothing heavy)."""
    p = subparsers.add_parser(
        "train",
        help="SFT stage 1, 2 or 3 on DeepSpeed (single CPU process, torchrun or deepspeed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)
