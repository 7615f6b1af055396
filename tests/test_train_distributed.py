"""Two-process gloo ZeRO-2 (torchrun) gives the same update as one process with the same global
batch: the data order, the loss normalisation across ranks and DeepSpeed's gradient averaging
all have to agree for the weights to match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monet_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# Stage 2 (latent proxy routing included), SGD so that the update is lr x gradient exactly.
ARGS = [
    "--stage",
    "2",
    "--config",
    str(ROOT / "configs" / "tiny" / "stage2.yaml"),
    "--max-steps",
    "2",
    "data.n=8",
    "model.latent_size=4",
    "teacher.mode=online",
    "optim.name=sgd",
    "optim.lr=0.1",
    "optim.weight_decay=0",
    "optim.grad_clip=0",
    "scheduler.name=constant",
    "scheduler.warmup_steps=0",
    "logging.progress=false",
    "trainer.micro_batch_size=2",
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this pytest process may have set them for its own gloo group
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return env


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_process_zero2_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    module = [sys.executable, "-m", "monet_fast.train.sft"]
    _run([*module, *ARGS, "--output", str(one), "trainer.grad_accum=2"])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    _run(
        [
            *torchrun,
            "-m",
            "monet_fast.train.sft",
            *ARGS,
            "--output",
            str(two),
            "trainer.grad_accum=1",
        ]
    )

    a, b = read_metrics(one), read_metrics(two)
    assert [m["samples"] for m in a] == [m["samples"] for m in b] == [4, 4]
    # Same samples per step; sums over ranks vs micro-batches differ only in fp32 rounding.
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in b]),
        torch.tensor([m["loss"] for m in a]),
        rtol=1e-5,
        atol=0,
    )
    wa = load_file(one / "hf" / "model.safetensors")
    wb = load_file(two / "hf" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
