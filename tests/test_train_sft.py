"""SFT recipes end to end on the tiny model, one CPU process (gloo) through DeepSpeed ZeRO-2:
loss goes down per stage, online == cached teacher, exact resume, gradient accumulation and
plain-torch equivalence, gradient checkpointing, export, clear errors, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monet_fast.data import collate, make_samples, write_synthetic_dataset
from monet_fast.data.reader import DataError
from monet_fast.stage import Stage
from monet_fast.train import teacher as T
from monet_fast.train.checkpoint import list_checkpoints
from monet_fast.train.config import ConfigError, DataSection
from monet_fast.train.data import load_samples
from monet_fast.train.loop import SFTRecipe
from monet_fast.train.metrics import read_metrics
from monet_fast.train.sft import RECIPES, build_config, precompute_teacher, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

# Small and fast: 4 synthetic samples, K = 4, no progress bar, fp32 on CPU.
FAST = [
    "data.n=4",
    "model.latent_size=4",
    "logging.progress=false",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum=2",
    "scheduler.warmup_steps=0",
    "scheduler.name=constant",
    "trainer.export=false",
]


def _run(tmp_path, stage, *overrides, name="run", resume=None, max_steps=None):
    out = tmp_path / name
    result = train(
        stage,
        TINY / f"stage{stage}.yaml",
        [*FAST, *overrides],
        output=out,
        max_steps=max_steps,
        resume=resume,
    )
    return result, read_metrics(out)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_loss_decreases_on_a_fixed_batch(tmp_path, stage):
    # n = global batch = 4: every step sees the same 4 samples.
    result, metrics = _run(tmp_path, stage, "optim.lr=3e-3", max_steps=6)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 6 and result.global_step == 6
    assert losses[-1] < losses[0] - 0.1, losses
    if stage > 1:
        assert all(m["align_loss"] is not None for m in metrics)
    ckpt = result.checkpoint
    assert ckpt.name == "step_0000006" and (ckpt.parent / "latest").read_text().strip() == ckpt.name
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["n_samples"] == 4


@pytest.mark.parametrize(
    "stage, dtype, rtol, extra",
    [
        (2, "float32", 1e-6, []),  # fp32 cache: the same numbers (up to batch-padding order)
        # The variants are slow-marked (~2-5 s each on 2 cores); `make test` runs them.
        # bf16 targets carry ~3 significant digits; the alignment term moves by ~1e-3 relative
        pytest.param(2, "bfloat16", 2e-3, [], marks=pytest.mark.slow),
        # a layer subset, online and cached
        pytest.param(2, "float32", 1e-6, ["teacher.layers=[0,2]"], marks=pytest.mark.slow),
        # cache read in a DataLoader worker
        pytest.param(3, "float32", 1e-6, ["data.num_workers=1"], marks=pytest.mark.slow),
    ],
)
def test_online_and_cached_teacher_give_the_same_loss(tmp_path, stage, dtype, rtol, extra):
    common = ["optim.lr=1e-3", "trainer.micro_batch_size=4", "trainer.grad_accum=1", *extra]
    _, online = _run(tmp_path, stage, *common, "teacher.mode=online", name="on", max_steps=2)
    _, cached = _run(
        tmp_path,
        stage,
        *common,
        "teacher.mode=cache",
        f"teacher.dtype={dtype}",
        "teacher.batch_size=4",
        name="cache",
        max_steps=2,
    )
    a = torch.tensor([m["loss"] for m in online], dtype=torch.float64)
    b = torch.tensor([m["loss"] for m in cached], dtype=torch.float64)
    torch.testing.assert_close(b, a, rtol=rtol, atol=0)
    assert all(m["align_loss"] > 0 for m in online)
    info = json.loads((tmp_path / "cache" / "teacher_cache" / "cache.json").read_text())
    assert info["n_samples"] == 4 and info["bytes_per_sample"] > 0


@pytest.mark.slow  # ~19 s on 2 busy cores: three stage-2 runs with checkpoints and an export
def test_resume_after_interruption_reproduces_losses_exactly(tmp_path, monkeypatch):
    args = ["data.n=8", "trainer.save_every=2", "trainer.export=true", "teacher.mode=online"]
    # 8 samples / global batch 4 = 2 steps per epoch: the run crosses an epoch boundary.
    full, want = _run(tmp_path, 2, *args, name="full", max_steps=5)

    calls = {"n": 0}
    original = SFTRecipe._train_step

    def crash_on_third_step(self, micro):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, micro)

    monkeypatch.setattr(SFTRecipe, "_train_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, 2, *args, name="cut", max_steps=5)
    monkeypatch.setattr(SFTRecipe, "_train_step", original)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_0000002"

    resumed, got = _run(tmp_path, 2, *args, name="cut", max_steps=5, resume=True)
    assert resumed.global_step == 5 and len(resumed.losses) == 3
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # exact: same computation
    assert [m["lr"] for m in got] == [m["lr"] for m in want]
    assert list_checkpoints(tmp_path / "full" / "checkpoints") == ["step_0000004", "step_0000005"]
    from safetensors.torch import load_file

    a = load_file(full.export / "model.safetensors")
    b = load_file(resumed.export / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~22 s on 2 busy cores: three DeepSpeed runs, three exports, plain torch
def test_accumulation_split_and_plain_torch_give_the_same_update(tmp_path):
    """SGD (update = lr x grad) makes the test see any gradient scale error."""
    sgd = ["optim.name=sgd", "optim.lr=0.1", "optim.grad_clip=0", "optim.weight_decay=0"]
    sgd.append("teacher.mode=online")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from monet_fast.model import latent_forward
    from monet_fast.model.tiny import tiny_model

    weights = []
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        res, _ = _run(
            tmp_path,
            2,
            *sgd,
            f"trainer.micro_batch_size={micro}",
            f"trainer.grad_accum={accum}",
            "trainer.export=true",
            name=f"m{micro}",
            max_steps=1,
        )
        weights.append(Qwen2_5_VLForConditionalGeneration.from_pretrained(res.export).state_dict())

    # Plain torch on the same 4 samples: latent_forward(...).loss.backward(), p -= lr * grad.
    model, processor = tiny_model(0, latent_size=4)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.visual.requires_grad_(False)
    model.train()
    samples = make_samples(4, 0)
    teacher = T.OnlineTeacher(tiny_model(0, latent_size=4)[0], processor, Stage.STAGE2, 4)(samples)
    out = latent_forward(model, collate(samples, processor, "stage2", 4), teacher=teacher)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    weights.append(model.state_dict())
    ref = weights[0]
    for other in weights[1:]:
        for k in ref:
            # fp32 sums over differently split micro-batches: rounding-level differences only.
            torch.testing.assert_close(other[k], ref[k], rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(ref[k], init[k]) for k in ref) > 10  # the step moved weights


@pytest.mark.slow  # ~9 s on 2 busy cores: two runs plus eval
def test_gradient_checkpointing_gives_the_same_stage1_losses(tmp_path):
    evals = ["eval.every=1", "eval.data={kind: synthetic, n: 2, start: 1000}"]
    _, plain = _run(tmp_path, 1, "optim.lr=1e-3", *evals, name="plain", max_steps=2)
    _, ckpt = _run(
        tmp_path, 1, "optim.lr=1e-3", "model.gradient_checkpointing=true", name="gc", max_steps=2
    )
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in ckpt]), torch.tensor([m["loss"] for m in plain])
    )
    assert all(m["eval_ce_loss"] > 0 for m in plain)  # eval hook: held-out CE in the same record


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_export_reloads_with_equal_logits(tmp_path, zero_stage):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from monet_fast.model import get_latent_config, latent_forward, load_pretrained

    cfg = build_config(
        2,
        TINY / "stage2.yaml",
        [*FAST, "optim.lr=3e-3", "teacher.mode=online", f"deepspeed.zero_stage={zero_stage}"],
        output=tmp_path / "run",
        max_steps=2,
    )
    recipe = RECIPES[2](cfg)
    try:
        recipe.setup()
        recipe.train()
        path = recipe.export()
        processor = recipe.processor
        batch = collate(make_samples(2, seed=9), processor, "stage2", 4)
        recipe.model.eval()
        with torch.no_grad():  # through the engine's module: ZeRO-3 gathers parameters
            want = latent_forward(recipe.model, batch, return_logits=True).logits
        plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
        ours, _ = load_pretrained(path)
        assert get_latent_config(ours).latent_size == 4  # K travels in config.json
        with torch.no_grad():
            for model in (plain, ours):
                got = latent_forward(model, batch, return_logits=True).logits
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        recipe.cleanup()


def test_clear_errors_for_runs_and_teacher_cache(tmp_path):
    _run(tmp_path, 1, name="done", max_steps=1)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        _run(tmp_path, 1, name="done", max_steps=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        _run(tmp_path, 1, name="fresh", max_steps=1, resume=True)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _run(tmp_path, 1, "data.n=3", name="small", max_steps=1)
    never = ["teacher.mode=cache", "teacher.precompute=never"]
    with pytest.raises(T.MissingTeacherEntry, match="lacks 4 of 4 samples.*precompute=never"):
        _run(tmp_path, 2, *never, name="nc", max_steps=1)
    info = precompute_teacher(
        2, TINY / "stage2.yaml", [*FAST, "teacher.mode=cache"], output=tmp_path / "nc"
    )
    assert info["n_samples"] == 4 and info["bytes_per_sample"] > 0
    result, _ = _run(tmp_path, 2, *never, name="nc", max_steps=1)  # now complete: no error
    assert result.global_step == 1


def test_bad_rows_are_skipped_and_counted_or_raise(tmp_path):
    path = write_synthetic_dataset(tmp_path / "data", 4, seed=0)
    rows = json.loads(path.read_text())
    # Drop the observation of row 2: the reference drops such samples.
    for item in rows[2]["data"][2]["content"]:
        if item["type"] == "text":
            item["text"] = item["text"].replace("<observation>", "").replace("</observation>", "")
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="row 2"):
        load_samples(DataSection(kind="monet_sft", path=str(path), on_error="raise"))
    samples, report = load_samples(DataSection(kind="monet_sft", path=str(path), on_error="skip"))
    assert len(samples) == 3 and report.n_skipped == 1 and "row 2" in report.skipped[0]


@pytest.mark.slow
def test_cli_trains_all_three_stages(tmp_path):
    """`monet-fast train` stage 1 -> 2 (init from 1) -> 3 (init from 1, teacher 2), as users run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.pop("MASTER_PORT", None)
    cli = [sys.executable, "-m", "monet_fast.cli", "train"]
    common = ["data.n=4", "model.latent_size=4", "logging.progress=false"]
    s1, s2, s3 = (tmp_path / f"s{i}" for i in (1, 2, 3))
    steps = [
        ["--stage", "1", "--config", str(TINY / "stage1.yaml"), "--output", str(s1)],
        ["--stage", "2", "--config", str(TINY / "stage2.yaml"), "--output", str(s2)]
        + ["--init", str(s1 / "hf")],
        ["--stage", "3", "--config", str(TINY / "stage3.yaml"), "--output", str(s3)]
        + ["--init", str(s1 / "hf")],
    ]
    extra = [[], [], [f"teacher.model={s2 / 'hf'}"]]
    for argv, more in zip(steps, extra):
        proc = subprocess.run(
            [*cli, *argv, "--max-steps", "2", *common, "trainer.micro_batch_size=2", *more],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "trained to step 2" in proc.stdout
    for out in (s1, s2, s3):
        assert (out / "hf" / "config.json").is_file() and len(read_metrics(out)) == 2
    header = json.loads((s3 / "teacher_cache" / "cache.json").read_text())
    assert header["kind"] == "latent_trajectories" and str(s2 / "hf") in header["teacher"]
