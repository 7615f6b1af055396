"""Latent diagnostics of the eval report: collapse on mean-centred latents, latent / embedding
norm ratios, trigger rate with the accuracy split fired / not fired, latent modes auto / off /
force, and the plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import monet_fast.eval.runner as runner
from monet_fast.data import make_samples
from monet_fast.decode import generate
from monet_fast.eval.collapse import centre, collapse_metrics, cosine_matrix
from monet_fast.eval.report import TRIGGER_PNG, build_report, trigger_stats, write_report
from monet_fast.eval.runner import EvalConfig, evaluate
from monet_fast.model import tiny_model
from monet_fast.model.feedback import embedding_norm
from monet_fast.model.tokens import LATENT_START
from monet_fast.tasks.scoring import ScoredItem

K = 3


def _shared_plus_distinct(n: int, shared: float = 100.0) -> list[np.ndarray]:
    """n one-latent traces: a large shared direction e0 plus a distinct unit e_{i+1} each."""
    eye = np.eye(n + 1)
    return [(shared * eye[0] + eye[i + 1])[None, :] for i in range(n)]


def test_centred_cosines_see_past_the_shared_direction():
    traces = _shared_plus_distinct(5)
    m = collapse_metrics(traces)
    assert m["mean_cos_across_all"] > 0.999  # raw: looks fully collapsed
    # Centred: e_i - mean(e) for 5 orthonormal e_i has pairwise cosine -1/(n-1).
    assert m["centred"]["mean_cos_across_all"] == pytest.approx(-0.25)
    assert m["centred"]["mean_cos_across_same_step"] == pytest.approx(-0.25)
    assert m["centred"]["effective_rank"] == pytest.approx(4.0, abs=1e-6)  # rank n-1
    assert m["effective_rank"] < 2.0
    # The heatmap option centres over the whole run, even when it shows fewer latents.
    mat, labels = cosine_matrix(traces, max_latents=3, centred=True)
    assert len(labels) == 3 and mat[0, 1] == pytest.approx(-0.25)
    # Identical latents centre to zero vectors: no direction, NaN, not a crash.
    same = collapse_metrics([np.ones((2, 4)), np.ones((2, 4))])
    assert math.isnan(same["centred"]["mean_cos_within"])
    assert [c.shape for c in centre([np.zeros((0, 3)), np.ones((1, 3))])] == [(0, 3), (1, 3)]


def test_norm_ratio_per_step():
    traces = [np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[6.0, 8.0]])]
    m = collapse_metrics(traces, embedding_norm=2.0)
    assert m["embedding_norm"] == 2.0
    assert [s["ratio"] for s in m["norm_per_step"]] == pytest.approx([7.5 / 2, 1.0])
    assert m["norm_ratio"] == pytest.approx((5 + 2 + 10) / 3 / 2)
    assert "norm_ratio" not in collapse_metrics(traces)
    with pytest.raises(ValueError, match="embedding_norm must be > 0"):
        collapse_metrics(traces, embedding_norm=0.0)


def _items(correct):
    return [ScoredItem(f"q{i}", ok, category="c") for i, ok in enumerate(correct)]


def test_trigger_stats_split_accuracy_by_fired():
    items = _items([True, False, False, False, True])
    t = trigger_stats(items, [True, True, False, False, True], n_boot=200)
    assert t["rate"] == pytest.approx(0.6) and (t["n_fired"], t["n_not_fired"]) == (3, 2)
    assert t["accuracy_fired"] == pytest.approx(2 / 3)
    assert t["accuracy_not_fired"] == 0.0
    assert t["ci"][0] <= 0.6 <= t["ci"][1]
    none_fired = trigger_stats(items, [False] * 5, n_boot=50)
    assert none_fired["rate"] == 0.0 and math.isnan(none_fired["accuracy_fired"])
    with pytest.raises(ValueError, match="fired has 2 entries for 5 items"):
        trigger_stats(items, [True, False])


def test_report_carries_trigger_centred_collapse_and_ratio(tmp_path):
    items = {"none": _items([True, False, True, True]), "zero": _items([False] * 4)}
    fired = {"none": [True, True, False, True], "zero": [True] * 4}
    traces = {"none": _shared_plus_distinct(4)}
    report = build_report(items, traces, fired=fired, embedding_norm=50.0, n_boot=100)
    assert report["trigger_rate"] == pytest.approx(0.75)
    assert report["interventions"]["zero"]["trigger"]["rate"] == 1.0
    collapse = report["interventions"]["none"]["collapse"]
    assert collapse["centred"]["mean_cos_across_all"] == pytest.approx(-1 / 3)
    assert collapse["norm_ratio"] == pytest.approx(math.sqrt(100**2 + 1) / 50)
    assert report["heatmap"]["centred"] is True
    assert report["heatmap"]["matrix"][0][1] == pytest.approx(-1 / 3, abs=1e-4)
    paths = write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "## Latent mode: auto" in md and "| none | 75.0% |" in md
    assert "centred: cos within" in md
    assert paths["trigger_plot"] == tmp_path / TRIGGER_PNG
    with Image.open(tmp_path / TRIGGER_PNG) as im:
        assert im.format == "PNG"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["interventions"]["none"]["trigger"]["n_fired"] == 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0, latent_size=K)


def test_latent_modes_and_trigger_split_in_evaluate(tiny, monkeypatch):
    """auto: the runner records which answers opened a block (here every other sample, forced
    by a patched decoder); off bans blocks even then; force makes every answer start with one."""
    model, processor = tiny
    start = processor.tokenizer.convert_tokens_to_ids(LATENT_START)
    calls = {"n": 0}

    def every_other(*args, logits_processor=None, **kwargs):
        opens = calls["n"] % 2 == 0
        calls["n"] += 1

        def proc(logits, index):
            if opens:
                logits[index == 0, start] += 1e6
            return logits if logits_processor is None else logits_processor(logits, index)

        return generate(*args, logits_processor=proc, **kwargs)

    monkeypatch.setattr(runner, "generate", every_other)
    samples = make_samples(4, seed=7)
    kw = dict(batch_size=1, max_new_tokens=K + 3, progress=False)
    auto = evaluate(model, processor, samples, EvalConfig(**kw))
    assert [p["fired"] for p in auto["predictions"]["none"]] == [True, False, True, False]
    assert auto["trigger_rate"] == 0.5 and auto["meta"]["latent_mode"] == "auto"
    ratio = auto["interventions"]["none"]["collapse"]["norm_per_step"][0]["ratio"]
    want = auto["interventions"]["none"]["collapse"]["norm_per_step"][0]["mean"] / float(
        embedding_norm(model)
    )
    assert ratio == pytest.approx(want)
    calls["n"] = 0
    off = evaluate(model, processor, samples, EvalConfig(latent_mode="off", **kw))
    assert off["trigger_rate"] == 0.0
    monkeypatch.setattr(runner, "generate", generate)
    force = evaluate(model, processor, samples, EvalConfig(latent_mode="force", **kw))
    assert force["trigger_rate"] == 1.0
    steps = force["interventions"]["none"]["collapse"]["norm_per_step"]
    assert len(steps) >= K and all(s["n"] == 4 for s in steps[:K])
    with pytest.raises(ValueError, match=r"latent_mode must be one of \['auto', 'off', 'force'\]"):
        EvalConfig(latent_mode="always")


def test_generate_prompt_ending_in_start_opens_a_block(tiny):
    """What `force` relies on: a prompt ending with <abs_vis_token> decodes K latents first."""
    model, processor = tiny
    sample = make_samples(1, seed=7)[0]
    from monet_fast.model.sequence import render_prompt

    out = generate(
        model,
        processor,
        [{"text": render_prompt(sample) + LATENT_START, "images": sample.question_images}],
        max_new_tokens=K + 2,
        return_latents=True,
    )
    assert out.latent_counts[0][:1] == [K]
    assert torch.is_tensor(out.latents[0])
