"""`monet-fast demo`: the whole pipeline on the embedded tiny model, offline, on CPU in minutes.

Phases: synthetic task -> Monet-SFT files on disk and back -> tiny model + tokenizer -> the
latent forward for every stage (batched vs the reference two-pass loop) -> summary + report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    n_train: int = 16
    n_eval: int = 8
    latent_size: int = 8
    seed: int = 0
    quick: bool = False


@dataclass
class DemoReport:
    task: dict = field(default_factory=dict)
    phases: list[dict] = field(default_factory=list)
    throughput: dict = field(default_factory=dict)

    def add(self, name: str, **info) -> None:
        self.phases.append({"name": name, **info})
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        print(f"[demo] {name}: {details}", flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run_demo(cfg: DemoConfig) -> DemoReport:
    from monet_fast.data import collate, make_samples, read_monet_sft, write_synthetic_dataset
    from monet_fast.model import latent_forward, tiny_model
    from monet_fast.model.latent_reference import reference_latent_forward

    cfg.out.mkdir(parents=True, exist_ok=True)
    report = DemoReport()
    n_train = 4 if cfg.quick else cfg.n_train
    t0 = time.perf_counter()
    json_path = write_synthetic_dataset(cfg.out / "data", n_train, seed=cfg.seed)
    train = read_monet_sft(json_path)
    held_out = make_samples(cfg.n_eval, seed=cfg.seed + 1)
    report.task = {
        "n_choices": len(train[0].choices or []),
        "n_train": len(train),
        "n_eval": len(held_out),
    }
    report.add("data", written=str(json_path), samples=len(train), seconds=time.perf_counter() - t0)

    model, processor = tiny_model(seed=cfg.seed, latent_size=cfg.latent_size)
    n_params = sum(p.numel() for p in model.parameters())
    report.add("model", kind="tiny Qwen2.5-VL", parameters=n_params, vocab=len(processor.tokenizer))

    with torch.no_grad():
        stage1 = collate(train, processor, "stage1")
        teacher_obs = latent_forward(model, stage1, return_states=True).obs_states
    for stage in ("stage1", "stage2", "stage3"):
        batch = collate(train, processor, stage, latent_size=cfg.latent_size)
        teacher = None
        if stage == "stage2":
            teacher = teacher_obs
        elif stage == "stage3":
            with torch.no_grad():
                s2 = collate(train, processor, "stage2", latent_size=cfg.latent_size)
                teacher = latent_forward(model, s2, return_states=True).slot_states
        t = time.perf_counter()
        out = latent_forward(model, batch, teacher=teacher)
        out.loss.backward()
        batched_s = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        info = {
            "loss": float(out.loss.detach()),
            "ce": float(out.ce_loss.detach()),
            "latents": sum(len(v) for v in out.latents),
            "samples_per_s": len(train) / batched_s,
        }
        if stage != "stage1":
            t = time.perf_counter()
            reference_latent_forward(model, batch, teacher=teacher).loss.backward()
            model.zero_grad(set_to_none=True)
            info["speedup_vs_two_pass"] = (time.perf_counter() - t) / batched_s
        report.add(f"{stage} forward+backward", **info)
        report.throughput[stage] = {"samples_per_s": info["samples_per_s"]}

    _write_json(
        cfg.out / "report.json",
        {"task": report.task, "phases": report.phases, "throughput": report.throughput},
    )
    print(f"[demo] report written to {cfg.out / 'report.json'}")
    return report


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded tiny model (offline)")
    p.add_argument("--out", type=Path, default=DemoConfig.out, help="output directory")
    p.add_argument("--quick", action="store_true", help="smaller version (used by CI)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(DemoConfig(out=args.out, quick=args.quick, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monet-fast demo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)
