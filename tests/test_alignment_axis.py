"""The alignment cosine's axis: `hidden` (our default) vs `reference` (the reference's
`F.cosine_similarity(teacher, student)` without `dim`, i.e. over the position axis of its
[layers, positions, hidden] tensors; REFERENCE.md §3.4). Checked against an independent float64
formula per sample, through `stage_loss`, and through the `loss.align_cosine` config key of a
stage-2 training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monet_fast.model.losses import LossConfig, alignment_per_sample, stage_loss
from monet_fast.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

# [layers, positions, hidden], awkward sizes included; one position is the degenerate case.
SHAPES = [(3, 5, 7), (4, 1, 6), (2, 9, 3), (29, 4, 16)]


def formula(teacher: torch.Tensor, student: torch.Tensor, cosine: str) -> float:
    """Written from the definition with explicit sums in float64, not from F.cosine_similarity.

    hidden:    mean over (l, p) of 1 - <t[l,p,:], s[l,p,:]> / (|t[l,p,:]| |s[l,p,:]|)
    reference: mean over (l, d) of 1 - <t[l,:,d], s[l,:,d]> / (|t[l,:,d]| |s[l,:,d]|)
    """
    t, s = teacher.detach().double(), student.detach().double()
    axis = 2 if cosine == "hidden" else 1
    dot = (t * s).sum(axis)
    norms = (t * t).sum(axis).sqrt() * (s * s).sum(axis).sqrt()
    return float((1.0 - dot / norms).mean())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cosine", ["hidden", "reference"])
def test_alignment_per_sample_equals_the_formula(shape, cosine):
    gen = torch.Generator().manual_seed(sum(shape))
    teacher = torch.randn(shape, generator=gen)
    student = teacher + 0.7 * torch.randn(shape, generator=gen)
    got = alignment_per_sample(teacher, student, cosine)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(formula(teacher, student, cosine), rel=1e-5, abs=1e-6)


def test_reference_axis_differs_from_hidden_axis():
    """A swapped implementation (both modes on one axis) fails here."""
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        teacher, student = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        hidden = alignment_per_sample(teacher, student, "hidden").item()
        ref = alignment_per_sample(teacher, student, "reference").item()
        assert abs(hidden - ref) > 1e-3, (shape, hidden, ref)
        # The default is the hidden axis.
        assert alignment_per_sample(teacher, student).item() == hidden


def test_reference_axis_special_values():
    t = torch.randn(3, 4, 8)
    for cosine in ("hidden", "reference"):
        assert alignment_per_sample(t, t, cosine).item() == pytest.approx(0.0, abs=1e-6)
        assert alignment_per_sample(t, -t, cosine).item() == pytest.approx(2.0, abs=1e-6)
    # Rescaling one position changes the hidden-axis cosine of nothing (it is per position)
    # but changes the reference's (it mixes positions).
    s = t.clone()
    s[:, 0] *= 5.0
    s[:, 1] += 1.0
    assert alignment_per_sample(t, s * 1.0, "hidden").item() > 0
    scaled = t.clone()
    scaled[:, 2] *= 3.0
    assert alignment_per_sample(t, scaled, "hidden").item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_per_sample(t, scaled, "reference").item() > 1e-3
    # One position: the reference's cosine is sign(t * s) per hidden unit.
    one_t, one_s = torch.randn(2, 1, 6), torch.randn(2, 1, 6)
    want = (1 - torch.sign(one_t * one_s)).mean().item()
    assert alignment_per_sample(one_t, one_s, "reference").item() == pytest.approx(want)


def test_bad_inputs_are_refused():
    t = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"align_cosine must be one of \['hidden', 'reference'\]"):
        alignment_per_sample(t, t, "positions")
    with pytest.raises(ValueError, match="do not match"):
        alignment_per_sample(t, t[:, :2], "hidden")
    with pytest.raises(ValueError, match=r"\[layers, positions, hidden\]"):
        alignment_per_sample(t[0], t[0], "reference")
    with pytest.raises(ValueError, match="align_cosine"):
        LossConfig(align_cosine="dim1")


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
@pytest.mark.parametrize("cosine", ["hidden", "reference"])
def test_stage_loss_averages_the_chosen_axis_over_samples(stage, cosine):
    gen = torch.Generator().manual_seed(1)
    # Two samples with positions, one without (skipped, as in the trainers).
    shapes = [(3, 4, 5), (3, 2, 5), (3, 0, 5)]
    teacher = [torch.randn(s, generator=gen) for s in shapes]
    student = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    cfg = LossConfig(align_cosine=cosine, latent_proxy_weight=0.0)
    ce = torch.tensor(1.5)
    loss, align, align_sum, count = stage_loss(
        stage, ce, student, teacher, cfg, [], {"closed": False}, ["a", "b", "c"]
    )
    want = (formula(teacher[0], student[0], cosine) + formula(teacher[1], student[1], cosine)) / 2
    assert count == 2
    assert align.item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(1.5 + 2.0 * want, rel=1e-5)


def test_config_key_is_validated_with_the_allowed_values():
    cfg = load_config(ROOT / "configs/tiny/stage2.yaml")
    assert cfg.loss.align_cosine == "hidden"
    cfg = load_config(ROOT / "configs/tiny/stage3.yaml", ["loss.align_cosine=reference"])
    assert cfg.loss.align_cosine == "reference"
    with pytest.raises(ConfigError, match=r"loss.align_cosine must be one of \['hidden', "):
        load_config(ROOT / "configs/tiny/stage2.yaml", ["loss.align_cosine=dim1"])


def test_stage2_train_step_uses_the_configured_axis(tmp_path):
    """One stage-2 step per setting from the same init and data: CE is the same, the alignment
    (and so the loss) differs, and the loss is CE + align_weight * alignment in both."""
    from monet_fast.train.metrics import read_metrics
    from monet_fast.train.sft import train

    fast = [
        "data.n=2",
        "model.latent_size=2",
        "logging.progress=false",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=1",
        "scheduler.warmup_steps=0",
        "scheduler.name=constant",
        "trainer.export=false",
        "teacher.mode=online",
    ]
    logged = {}
    for cosine in ("hidden", "reference"):
        out = tmp_path / cosine
        train(
            2,
            ROOT / "configs/tiny/stage2.yaml",
            [*fast, f"loss.align_cosine={cosine}"],
            output=out,
            max_steps=1,
        )
        (logged[cosine],) = read_metrics(out)
    h, r = logged["hidden"], logged["reference"]
    assert h["ce_loss"] == pytest.approx(r["ce_loss"], rel=1e-6)
    # The teacher is the init model itself (stage 1 = init here), so both alignments are small;
    # they differ by ~20 %, far above fp32 noise.
    diff = abs(h["align_loss"] - r["align_loss"])
    assert diff > 0.05 * max(h["align_loss"], r["align_loss"]) > 0, (h, r)
    for m in (h, r):
        assert m["loss"] == pytest.approx(m["ce_loss"] + 2.0 * m["align_loss"], rel=1e-5)
    assert h["loss"] != pytest.approx(r["loss"], rel=1e-6, abs=1e-6)
