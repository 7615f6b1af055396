"""Crash-safe checkpoints: a crash at any filesystem step of a save leaves `latest` naming a
complete checkpoint that verifies; damaged checkpoints are detected (missing file, size, hash)
and resume falls back to the previous good one; retention never removes what `latest` names;
nodes without a shared filesystem each keep their own copy and resume to the same losses."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monet_fast.train import checkpoint as ckpt
from monet_fast.train import ckpt_manifest

ROOT = Path(__file__).resolve().parents[1]


class FakeEngine:
    """Writes files the way DeepSpeed does (one directory per tag, model + one shard)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        step = client_state[ckpt._CLIENT_KEY]["global_step"]
        torch.save({"step": step}, d / "mp_rank_00_model_states.pt")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes([step % 256]) * 4096)


def _progress(step: int) -> ckpt.TrainingProgress:
    return ckpt.TrainingProgress(
        seed=0, global_batch_size=2, dataset_fingerprint="x", n_samples=8, global_step=step
    )


def _save(root: Path, step: int, keep_last: int = 2) -> Path:
    return ckpt.save_checkpoint(FakeEngine(), root, _progress(step), keep_last=keep_last)


def _step_of(root: Path, tag: str) -> int:
    return torch.load(root / tag / "mp_rank_00_model_states.pt")["step"]


class Crash(Exception):
    pass


def _crash_at(monkeypatch, n: int) -> dict:
    """Raise Crash at the n-th filesystem mutation (rename, rmtree, fsync) from now on."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash(f"crash at mutation {n}: {fn.__name__}{args[:1]}")
            return fn(*args, **kwargs)

        return inner

    for name in ("replace", "fsync"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))
    return calls


@pytest.mark.parametrize("resave", [False, True], ids=["next_step", "same_step_again"])
def test_a_crash_at_any_point_of_a_save_leaves_a_good_latest(tmp_path, monkeypatch, resave):
    # same_step_again: a run resumed from an older tag re-saves the step `latest` names (the
    # case where the old code deleted that directory before renaming its replacement).
    n = 0
    while True:
        n += 1
        root = tmp_path / f"crash{n}"
        _save(root, 2)
        _save(root, 4)
        with monkeypatch.context() as m:
            calls = _crash_at(m, n)
            try:
                _save(root, 4 if resave else 6)
                finished = True
            except Crash:
                finished = False
        where, tag = ckpt.resolve_resume(root, "latest")
        assert ckpt_manifest.verify(where / tag) is None
        assert _step_of(where, tag) in ((4,) if resave else (4, 6))
        if finished:
            assert calls["n"] < n  # every mutation of a whole save was crashed once
            break
    assert n > 8  # the save does at least this many renames / fsyncs / deletions


def test_retention_and_revisions(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2, 3):
        _save(root, step)
    assert ckpt.list_checkpoints(root) == ["step_0000002", "step_0000003"]
    # The same step again: a new directory (revision), the superseded one goes after commit.
    path = _save(root, 3)
    assert path.name == "step_0000003.r1" and ckpt.latest_tag(root) == "step_0000003.r1"
    assert ckpt.list_checkpoints(root) == ["step_0000002", "step_0000003.r1"]
    # keep_last=1 keeps only what `latest` names; nothing temporary is left behind.
    _save(root, 4, keep_last=1)
    assert ckpt.list_checkpoints(root) == ["step_0000004"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]
    manifest = json.loads((root / "step_0000004" / "manifest.json").read_text())
    assert manifest["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["size"] == 4096


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(), "missing"),
        (lambda d: os.truncate(d / "mp_rank_00_model_states.pt", 10), "size 10, manifest says"),
        (
            lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\1" * 4096),
            "sha256",
        ),
        (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
        (lambda d: shutil.rmtree(d), "names step_0000004, which is missing"),
    ],
    ids=["missing_file", "truncated", "flipped_bytes", "bad_manifest", "missing_dir"],
)
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog, damage, message):
    root = tmp_path / "ck"
    _save(root, 2)
    _save(root, 4)
    damage(root / "step_0000004")
    with caplog.at_level(logging.WARNING, logger="monet_fast.train.checkpoint"):
        where, tag = ckpt.resolve_resume(root, "latest")
    assert tag == "step_0000002"
    assert message in caplog.text and "falling back" in caplog.text
    if message != "names step_0000004, which is missing":
        with pytest.raises(FileNotFoundError, match="unusable"):
            ckpt.resolve_resume(root, "step_0000004")
    damage_all = root / "step_0000002" / "mp_rank_00_model_states.pt"
    damage_all.unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        ckpt.resolve_resume(root, "latest")


def test_uncommitted_checkpoints_are_not_resumed_and_nodes_agree():
    # A directory renamed into place but never committed (no `latest` update) is not a candidate.
    assert ckpt.agree_on_tag([["step_0000004", "step_0000002"]]) == "step_0000004"
    # Node 1 crashed between the two nodes' `latest` updates: both resume from step 2.
    lists = [["step_0000004", "step_0000002"], ["step_0000002"]]
    assert ckpt.agree_on_tag(lists) == "step_0000002"
    assert ckpt.agree_on_tag([["step_0000004"], ["step_0000002"]]) is None
    assert ckpt.agree_on_tag([["step_0000004.r1", "step_0000004"]]) == "step_0000004.r1"


def test_uncommitted_directory_is_ignored(tmp_path):
    root = tmp_path / "ck"
    _save(root, 2)
    shutil.copytree(root / "step_0000002", root / "step_0000004")  # renamed, latest not updated
    assert ckpt.resume_candidates(root)[0] == ["step_0000002"]
    assert _save(root, 4).name == "step_0000004.r1"  # never overwritten in place


# ---- two "nodes" without a shared filesystem (2 processes, gloo) ------------------------------

ARGS = [
    "--stage",
    "1",
    "--config",
    str(ROOT / "configs" / "tiny" / "stage1.yaml"),
    "data.n=8",
    "model.latent_size=4",
    "logging.progress=false",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum=1",
    "trainer.save_every=2",
    "trainer.export=false",
    "scheduler.warmup_steps=0",
    "trainer.shared_filesystem=false",
]


def _two_nodes(base: Path, max_steps: int, *extra: str) -> None:
    """Launch ranks 0 and 1 as two single-process "nodes" (LOCAL_RANK=0 each), each writing
    to its own output directory: neither sees the other's files."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK="0",
            OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, "-m", "monet_fast.train.sft", *ARGS]
        cmd += ["--output", str(base / f"node{rank}"), "--max-steps", str(max_steps), *extra]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-4000:]


def _step_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step record node 0 logged, in order (re-done steps included)."""
    lines = (run / "node0" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in recs if "step" in r and "event" not in r]


def _weights(run: Path, node: int, tag: str) -> dict:
    path = run / f"node{node}" / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow
def test_two_nodes_without_shared_filesystem_resume_exactly(tmp_path):
    _two_nodes(tmp_path, 6)
    for node in (0, 1):  # each node holds its own model states and its own ZeRO shard
        d = tmp_path / f"node{node}" / "checkpoints" / "step_0000006"
        assert sorted(p.name for p in d.iterdir()) == [
            "manifest.json",
            "mp_rank_00_model_states.pt",
            f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt",
        ]
    want = dict(_step_losses(tmp_path))
    final = [_weights(tmp_path, node, "step_0000006") for node in (0, 1)]
    # Node 1's newest checkpoint is damaged: both nodes must agree on step 4 and redo 5..6.
    node1 = tmp_path / "node1" / "checkpoints" / "step_0000006"
    (node1 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _two_nodes(tmp_path, 6, "--resume")
    records = _step_losses(tmp_path)
    assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6, 5, 6]
    assert all(loss == want[s] for s, loss in records)  # exact: the same computation
    for node in (0, 1):
        again = _weights(tmp_path, node, "step_0000006.r1")  # a new directory, never in place
        assert all(torch.equal(again[k], final[node][k]) for k in again)
