"""Bootstrap statistics, collapse metrics on constructed traces, latent interventions (each
changes exactly what it should, checked on traces), and the written report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from monet_fast.eval.collapse import collapse_metrics, cosine_matrix, effective_rank
from monet_fast.eval.interventions import (
    INTERVENTIONS,
    LatentIntervention,
    apply_to_traces,
    parse_interventions,
)
from monet_fast.eval.report import (
    ACCURACY_PNG,
    HEATMAP_PNG,
    REPORT_JSON,
    REPORT_MD,
    build_report,
    to_jsonable,
    write_report,
)
from monet_fast.eval.stats import bootstrap_ci, bootstrap_means, paired_bootstrap_delta
from monet_fast.tasks.scoring import ScoredItem

HIDDEN = 24


# ---- stats -----------------------------------------------------------------------------------


def test_bootstrap_ci_basic_properties():
    values = np.r_[np.ones(70), np.zeros(30)]
    mean, (lo, hi) = bootstrap_ci(values, n_boot=2000, seed=3)
    assert mean == pytest.approx(0.7)
    assert lo < 0.7 < hi
    # Binomial standard error sqrt(.7*.3/100) = 0.046: the 95% interval is about +-0.09.
    assert 0.12 < hi - lo < 0.24
    assert bootstrap_ci(values, n_boot=2000, seed=3) == (mean, (lo, hi))  # deterministic
    assert bootstrap_ci(np.ones(5)) == (1.0, (1.0, 1.0))
    narrower = bootstrap_ci(values, n_boot=2000, alpha=0.5, seed=3)[1]
    assert lo < narrower[0] <= narrower[1] < hi
    empty = bootstrap_ci([])
    assert math.isnan(empty[0]) and all(math.isnan(x) for x in empty[1])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(values, alpha=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(values, n_boot=0)


def test_paired_bootstrap_delta():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.6).astype(float)
    same = paired_bootstrap_delta(base, base)
    assert same == (0.0, (0.0, 0.0))  # identical runs: no uncertainty at all when paired
    flipped = base.copy()
    flipped[np.flatnonzero(base)[:40]] = 0.0  # 40 of 400 items lost: -0.1 exactly
    delta, (lo, hi) = paired_bootstrap_delta(base, flipped, n_boot=2000)
    assert delta == pytest.approx(-0.1)
    assert lo < -0.1 < hi < 0
    # Pairing matters: resampling the two runs independently gives a much wider interval.
    unpaired = np.quantile(
        bootstrap_means(flipped, 2000, seed=1) - bootstrap_means(base, 2000, seed=2), [0.025, 0.975]
    )
    assert hi - lo < 0.6 * (unpaired[1] - unpaired[0])
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_delta(base, base[:-1])


# ---- collapse --------------------------------------------------------------------------------


def orthonormal(n: int, hidden: int = HIDDEN) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(hidden, n, dtype=torch.float64))
    return q.T  # [n, hidden], orthonormal rows


def test_identical_latents_are_fully_collapsed():
    v = torch.randn(HIDDEN)
    traces = [v.expand(2, 3, HIDDEN).clone() * 2.0 for _ in range(4)]  # [n_blocks, K, H]
    m = collapse_metrics(traces)
    assert m["n_latents"] == 24 and m["n_samples_with_latents"] == 4
    for key in ("mean_cos_within", "mean_cos_across_same_step", "mean_cos_across_all"):
        assert m[key] == pytest.approx(1.0, abs=1e-12)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["n_pairs_within"] == 4 * 15 and m["n_pairs_across_same_step"] == 6 * 6


def test_orthogonal_latents():
    q = orthonormal(12) * 5.0
    traces = [q[4 * s : 4 * s + 4] for s in range(3)]  # 3 samples x 4 latents, all orthogonal
    m = collapse_metrics(traces)
    for key in ("mean_cos_within", "mean_cos_across_same_step", "mean_cos_across_all"):
        assert m[key] == pytest.approx(0.0, abs=1e-12)
    assert m["effective_rank"] == pytest.approx(12.0, abs=1e-9)
    assert m["effective_rank_max"] == 12
    assert effective_rank(q) == pytest.approx(12.0, abs=1e-9)
    # Two directions with singular values 3 and 1: p = (3/4, 1/4), exp of the entropy.
    two = torch.zeros(2, HIDDEN, dtype=torch.float64)
    two[0, 0], two[1, 1] = 3.0, 1.0
    assert effective_rank(two) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )
    assert effective_rank(torch.cat([q, q])) == pytest.approx(12.0, abs=1e-9)  # duplicates add none


def test_norms_per_step_exact_and_ragged_traces():
    e = torch.eye(HIDDEN, dtype=torch.float64)
    traces = [
        torch.stack([1.0 * e[0], 2.0 * e[1], 3.0 * e[2]]),
        torch.stack([3.0 * e[3], 4.0 * e[4]]),
        None,  # no latent emitted
        torch.zeros(0, HIDDEN),
    ]
    m = collapse_metrics(traces)
    assert m["n_samples"] == 4 and m["n_samples_with_latents"] == 2 and m["n_latents"] == 5
    steps = m["norm_per_step"]
    assert [s["n"] for s in steps] == [2, 2, 1]
    assert steps[0]["mean"] == 2.0 and steps[0]["std"] == 1.0
    assert steps[1]["mean"] == 3.0 and steps[1]["std"] == 1.0
    assert steps[2]["mean"] == 3.0 and steps[2]["std"] == 0.0
    assert m["norm_mean"] == pytest.approx(13 / 5)


def test_mixed_cosines_and_zero_vectors():
    a, b = torch.zeros(HIDDEN), torch.zeros(HIDDEN)
    a[0], b[1] = 1.0, 1.0
    traces = [torch.stack([a, a]), torch.stack([a, b]), torch.stack([torch.zeros(HIDDEN), b])]
    m = collapse_metrics(traces)
    # within: pair (a,a)=1, (a,b)=0; the zero vector has no direction and is left out.
    assert m["mean_cos_within"] == pytest.approx(0.5)
    assert m["n_zero_norm"] == 1
    # same step 0: a,a -> 1 (sample 2's step 0 is zero); step 1: a,b,b -> (0+0+1)/3.
    assert m["mean_cos_across_same_step"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    matrix, labels = cosine_matrix(traces, max_latents=5)
    assert labels == [(0, 0), (0, 1), (1, 0), (1, 1)]  # sample 2 does not fit whole
    assert matrix.shape == (4, 4) and matrix[0, 1] == pytest.approx(1.0) and matrix[1, 3] == 0.0
    full, _ = cosine_matrix(traces)
    assert np.isnan(full[4]).all()  # zero vector row
    with pytest.raises(ValueError, match="hidden sizes"):
        collapse_metrics([torch.randn(2, 3), torch.randn(2, 4)])


def test_collapse_of_no_latents():
    m = collapse_metrics([None, torch.zeros(0, HIDDEN)])
    assert m["n_latents"] == 0 and math.isnan(m["mean_cos_within"])
    assert math.isnan(m["effective_rank"]) and m["norm_per_step"] == []


# ---- interventions ---------------------------------------------------------------------------


@pytest.fixture
def traces() -> list[torch.Tensor]:
    # Ragged: 4, 3, 4, 2 latents; two-block layout for sample 0.
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 2, HIDDEN), (3, HIDDEN), (4, HIDDEN), (2, HIDDEN)]
    return [torch.randn(*s, generator=g) * (i + 1) for i, s in enumerate(shapes)]


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def test_registry_and_flags():
    assert INTERVENTIONS == ("none", "zero", "constant", "noise", "shuffle", "mask", "no-latent")
    assert parse_interventions("zero, shuffle,none,zero") == ["none", "zero", "shuffle"]
    assert parse_interventions(["mask"]) == ["none", "mask"]
    with pytest.raises(ValueError, match="must be one of"):
        parse_interventions("none,blur")
    with pytest.raises(ValueError, match="must be one of"):
        LatentIntervention("blur")
    flags = {n: LatentIntervention(n) for n in INTERVENTIONS}
    assert [n for n, i in flags.items() if i.masks_latent_slots] == ["mask"]
    assert [n for n, i in flags.items() if i.skips_latent_blocks] == ["no-latent"]
    assert [n for n, i in flags.items() if i.modifies_vectors] == [
        "zero",
        "constant",
        "noise",
        "shuffle",
    ]


@pytest.mark.parametrize("name", ["none", "mask"])
def test_identity_interventions(traces, name):
    x = torch.randn(3, HIDDEN)
    assert LatentIntervention(name).transform(x, torch.arange(3), 0) is x
    out = apply_to_traces(LatentIntervention(name), traces)
    for before, after in zip(traces, out):
        assert after.shape == before.shape and torch.equal(after, before)


def test_no_latent_gives_empty_traces(traces):
    out = apply_to_traces(LatentIntervention("no-latent"), traces)
    assert all(t.shape == (0, HIDDEN) for t in out)


def test_zero(traces):
    out = apply_to_traces(LatentIntervention("zero"), traces)
    assert all(a.shape == b.shape and not a.any() for a, b in zip(out, traces))
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    assert LatentIntervention("zero").transform(x, [0, 1], 0).dtype == torch.bfloat16


def test_constant(traces):
    fitted = LatentIntervention("constant", seed=1).fit(traces)
    out = torch.cat([flat(t) for t in apply_to_traces(fitted, traces)])
    assert torch.equal(out, out[:1].expand_as(out))  # one vector for every latent of every sample
    mean_norm = torch.cat([flat(t).norm(dim=1) for t in traces]).mean()
    assert out[0].norm() == pytest.approx(float(mean_norm), rel=1e-5)
    other = LatentIntervention("constant", seed=2).fit(traces)
    assert not torch.allclose(other.transform(out[:1], [0], 0), out[:1])  # seed sets the direction
    scaled = LatentIntervention("constant", constant_norm=3.0).transform(
        torch.randn(2, HIDDEN), [0, 1], 0
    )
    assert scaled[0].norm() == pytest.approx(3.0, rel=1e-5)
    given = torch.arange(HIDDEN, dtype=torch.float32)
    x = LatentIntervention("constant", constant=given).transform(
        torch.randn(3, HIDDEN), [0, 1, 2], [0, 5, 1]
    )
    assert torch.equal(x, given.expand(3, -1))
    with pytest.raises(ValueError, match="only applies"):
        LatentIntervention("zero", constant=given)
    # Without fit or norm: the first batch's mean norm, then frozen for the whole run.
    lazy = LatentIntervention("constant")
    first = lazy.transform(torch.ones(2, HIDDEN), [0, 1], 0)
    assert first[0].norm() == pytest.approx(HIDDEN**0.5, rel=1e-5)
    assert torch.equal(lazy.transform(10 * torch.ones(1, HIDDEN), [2], 0)[0], first[0])


def test_noise(traces):
    noise = LatentIntervention("noise", seed=4)
    out = apply_to_traces(noise, traces)
    for before, after in zip(traces, out):
        b, a = flat(before), flat(after)
        assert a.shape == b.shape
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=1))  # same norm per latent
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert cos.abs().max() < 0.9  # a new direction (random in 24-D: |cos| ~ 0.2)
    again = apply_to_traces(LatentIntervention("noise", seed=4), traces)
    assert all(torch.equal(x, y) for x, y in zip(out, again))  # deterministic by seed
    reseeded = apply_to_traces(LatentIntervention("noise", seed=5), traces)
    assert not torch.equal(out[1], reseeded[1])
    # Per (sample, step), independent of the batch it arrives in.
    x = flat(traces[2])[1:2]
    alone = noise.transform(x, [2], 1)
    assert torch.equal(alone[0], flat(out[2])[1])


def test_shuffle(traces):
    shuffle = LatentIntervention("shuffle", seed=0)
    assert shuffle.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        shuffle.transform(torch.randn(1, HIDDEN), [0], 0)
    shuffle.fit(traces)
    out = apply_to_traces(shuffle, traces)
    bank = [flat(t) for t in traces]
    for s, after in enumerate(out):
        for k, row in enumerate(flat(after)):
            donor = shuffle.donor_of(s, k)
            assert donor != s  # never its own latent
            assert torch.equal(row, bank[donor][k])  # the donor's latent at the same step
            # and indeed no other sample's same-step latent is its own
            assert not torch.equal(row, bank[s][k])
    # Steps 2-3 exist only in samples 0 and 2: they must swap with each other.
    assert {shuffle.donor_of(0, 3), shuffle.donor_of(2, 3)} == {2, 0}
    # Deterministic derangement.
    other = LatentIntervention("shuffle", seed=0).fit(traces)
    assert [other.donor_of(s, 0) for s in range(4)] == [shuffle.donor_of(s, 0) for s in range(4)]
    with pytest.raises(ValueError, match="outside the 4 fitted samples"):
        shuffle.donor_of(4, 0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        LatentIntervention("shuffle").fit([traces[0], None])


def test_transform_validates_shapes():
    zero = LatentIntervention("zero")
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        zero.transform(torch.randn(HIDDEN), [0], 0)
    with pytest.raises(ValueError, match="one sample_index and step per row"):
        zero.transform(torch.randn(2, HIDDEN), [0], 0)


# ---- report ----------------------------------------------------------------------------------


def make_items(correct: list[bool], prefix="q") -> list[ScoredItem]:
    return [
        ScoredItem(f"{prefix}{i}", ok, category="a" if i % 2 else "b")
        for i, ok in enumerate(correct)
    ]


def test_build_and_write_report(tmp_path, traces):
    rng = np.random.default_rng(1)
    base = list(rng.random(60) < 0.7)
    items = {
        "zero": make_items([False] * 60),
        "none": make_items(base),
        "shuffle": make_items(base[:-1] + [not base[-1]]),
        "no-latent": make_items(base),
    }
    items["none"][0].judge = "correct"
    run_traces = {"none": traces, "zero": apply_to_traces(LatentIntervention("zero"), traces)}
    report = build_report(
        items, run_traces, meta={"bench": "vstar", "model": "tiny"}, n_boot=200, heatmap_latents=8
    )
    runs = report["interventions"]
    assert list(runs) == ["none", "zero", "shuffle", "no-latent"]  # registry order
    assert runs["none"]["accuracy"] == pytest.approx(np.mean(base))
    assert runs["none"]["delta_vs_baseline"] == 0.0 and runs["none"]["n_paired"] == 60
    assert runs["zero"]["delta_vs_baseline"] == pytest.approx(-np.mean(base))
    lo, hi = runs["zero"]["delta_ci"]
    assert lo <= runs["zero"]["delta_vs_baseline"] <= hi < 0
    assert runs["no-latent"]["delta_ci"] == [0.0, 0.0]
    assert runs["none"]["judge"] == {"asked": 1, "correct": 1, "errors": 0}
    assert set(runs["none"]["by_category"]) == {"a", "b"} == set(report["categories"])
    assert runs["none"]["collapse"]["n_latents"] == 13
    assert math.isnan(runs["zero"]["collapse"]["mean_cos_within"])  # zeros have no direction
    assert runs["shuffle"]["collapse"] is None
    assert report["heatmap"]["intervention"] == "none"
    assert len(report["heatmap"]["matrix"]) == len(report["heatmap"]["labels"]) <= 8

    paths = write_report(tmp_path / "out", report)
    out = tmp_path / "out"
    for name in (REPORT_JSON, REPORT_MD, ACCURACY_PNG, HEATMAP_PNG):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind
    for png in (ACCURACY_PNG, HEATMAP_PNG):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG"
    loaded = json.loads((out / REPORT_JSON).read_text())
    assert loaded == to_jsonable(report)  # NaN -> null, tuples -> lists; nothing else lost
    assert loaded["interventions"]["zero"]["collapse"]["mean_cos_within"] is None
    md = (out / REPORT_MD).read_text()
    for name in runs:
        assert f"| {name} |" in md
    assert "| intervention | accuracy | 95% CI | Δ vs none (pp) | Δ 95% CI | n |" in md
    assert "## Accuracy by category" in md and "## Latent collapse" in md
    assert paths["heatmap_plot"] == out / HEATMAP_PNG


def test_report_without_baseline_or_traces(tmp_path):
    report = build_report({"zero": make_items([True, False])}, n_boot=50)
    assert report["interventions"]["zero"]["delta_vs_baseline"] is None
    assert report["heatmap"] is None
    write_report(tmp_path, report)  # the heatmap panel says no traces were recorded
    with Image.open(tmp_path / HEATMAP_PNG) as im:
        assert im.format == "PNG"
    assert "| zero | 50.0% |" in (tmp_path / REPORT_MD).read_text()
