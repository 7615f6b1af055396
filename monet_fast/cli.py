"""The `monet-fast` command line: env, bench (and demo, train, rl, generate, eval as they land)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from monet_fast._optional import exit_missing_dependency


def _cmd_env(args: argparse.Namespace) -> int:
    from monet_fast.env_info import collect_env, format_env

    info = collect_env()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from monet_fast.bench import REGISTRY, format_report, run_benchmark, write_json

    if args.name == "list":
        print("\n".join(sorted(REGISTRY)))
        return 0
    report = run_benchmark(args.name, quick=args.quick, only=args.only)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


# Modules that add their own subcommands: each defines `register(subparsers)` and sets
# `func` on its parser. All are imported to build the parser (for every command, `env` and
# `--help` included), so their top-level imports must stay light: the standard library and
# monet_fast modules that need no optional dependency. A subcommand imports what it needs when
# it runs, optional packages through `monet_fast._optional.require` (tests/test_install.py
# builds the parser with the optional packages hidden).
COMMAND_MODULES: list[str] = [
    "monet_fast.demo",
    "monet_fast.train.cli",
    "monet_fast.train.rl_cli",
    "monet_fast.decode.cli",
    "monet_fast.serve.cli",
    "monet_fast.eval.cli",
    "monet_fast.kernel_check",
    "monet_fast.train.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "env", help="print versions, extension build facts and GPUs (for bug reports)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser(
        "bench", help="run a benchmark: ratio table, optional JSON ('list' lists them)"
    )
    p.add_argument("name", help="benchmark name, or 'list'")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--only", metavar="SUBSTR", help="only the cases whose label contains SUBSTR")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_cmd_bench)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"monet-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        # An optional dependency (deepspeed, matplotlib, ...) missing: one line naming the
        # extra that installs it, not a traceback. Any other missing module is a bug: re-raised.
        return exit_missing_dependency(err, f"monet-fast {args.command}")


if __name__ == "__main__":
    sys.exit(main())
