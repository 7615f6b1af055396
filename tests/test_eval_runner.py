"""The eval loop end to end on the tiny model: every intervention changes what it should inside
decoding (checked on the latent traces), the report has every section, and `monet-fast eval`."""

import json

import pytest
import torch

import monet_fast.eval.runner as runner
from monet_fast.cli import main
from monet_fast.data import make_samples, write_synthetic_dataset
from monet_fast.decode import generate
from monet_fast.eval.runner import EvalConfig, evaluate
from monet_fast.model import tiny_model
from monet_fast.model.loading import save_pretrained
from monet_fast.model.tokens import LATENT_END, LATENT_START

K = 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0, latent_size=K)


@pytest.fixture
def opens_block_first(monkeypatch, tiny):
    """The random tiny model never opens a latent block by itself: make the first output token
    <abs_vis_token> (composed with the runner's own logits processor)."""
    start = tiny[1].tokenizer.convert_tokens_to_ids(LATENT_START)

    def patched(*args, logits_processor=None, **kwargs):
        def proc(logits, index):
            logits[index == 0, start] += 1e6
            return logits if logits_processor is None else logits_processor(logits, index)

        return generate(*args, logits_processor=proc, **kwargs)

    monkeypatch.setattr(runner, "generate", patched)


def _fitted(name, none_traces):
    from monet_fast.eval.interventions import LatentIntervention

    iv = LatentIntervention(name, seed=0)
    if iv.needs_fit:
        iv.fit(none_traces)
    return iv


def test_interventions_change_exactly_what_they_should(tiny, opens_block_first):
    model, processor = tiny
    samples = make_samples(3, seed=5)
    cfg = EvalConfig(batch_size=2, max_new_tokens=2 + K, progress=False)
    run = {}
    for name in ("none", "zero", "constant", "noise", "shuffle", "mask", "no-latent"):
        iv = _fitted(name, run["none"].traces if name == "shuffle" else None)
        run[name] = runner.run_intervention(model, processor, samples, iv, cfg)
    none = run["none"].traces
    assert all(t.shape == (K, model.config.text_config.hidden_size) for t in none)
    assert all(t.abs().sum() == 0 for t in run["zero"].traces)
    const = torch.cat(run["constant"].traces)
    assert torch.allclose(const, const[:1].expand_as(const))
    for a, b in zip(none, run["noise"].traces):
        # the first fed vector is the same hidden state in both runs: same norm, new direction
        torch.testing.assert_close(b[0].norm(), a[0].norm(), rtol=1e-4, atol=1e-4)
        assert torch.nn.functional.cosine_similarity(a[0], b[0], dim=0) < 0.9
    iv = _fitted("shuffle", none)
    for s, t in enumerate(run["shuffle"].traces):
        donor = iv.donor_of(s, 0)
        assert donor != s
        torch.testing.assert_close(t[0], none[donor][0])
    # mask hides a closed block from later tokens only: the block itself is unchanged
    for a, b in zip(none, run["mask"].traces):
        torch.testing.assert_close(a, b)
    # no-latent never opens a block
    assert all(t.shape[0] == 0 for t in run["no-latent"].traces)
    assert all(LATENT_START not in text for text in run["no-latent"].texts)
    assert all(LATENT_END in text for text in run["none"].texts)


def test_hide_latents_masks_closed_blocks_in_decoding(tiny):
    """hide_latents: the block itself decodes as usual, what follows it no longer depends on the
    latent vectors."""
    model, processor = tiny
    start = processor.tokenizer.convert_tokens_to_ids(LATENT_START)
    item = {"text": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "images": []}

    def force(logits, index):
        logits[index == 0, start] += 1e6
        return logits

    kw = dict(max_new_tokens=K + 4, logits_processor=force, return_latents=True)
    plain = generate(model, processor, [item], **kw)
    hidden = generate(model, processor, [item], hide_latents=True, **kw)
    # identical up to and including the forced close; the latents themselves are unchanged
    n = K + 2
    assert plain.sequences[0][:n].tolist() == hidden.sequences[0][:n].tolist()
    torch.testing.assert_close(plain.latents[0], hidden.latents[0])
    # hiding the slots changes what comes after the block (seeded tiny model)
    assert plain.sequences[0][n:].tolist() != hidden.sequences[0][n:].tolist()
    # ... and the answer no longer reads the slots: with the slots' hidden states replaced by
    # anything (here zeros) the hidden run is unchanged
    zeroed = generate(
        model,
        processor,
        [item],
        hide_latents=True,
        latent_transform=lambda h, i: torch.zeros_like(h),
        **kw,
    )
    assert zeroed.sequences[0][n:].tolist() == hidden.sequences[0][n:].tolist()


def test_evaluate_report_sections(tiny, opens_block_first, tmp_path):
    model, processor = tiny
    samples = make_samples(4, seed=7)
    cfg = EvalConfig(
        interventions="none,zero,shuffle,no-latent", batch_size=4, max_new_tokens=K + 3,
        progress=False,
    )  # fmt: skip
    report = evaluate(model, processor, samples, cfg, out_dir=tmp_path)
    assert set(report["interventions"]) == {"none", "zero", "shuffle", "no-latent"}
    for name, run in report["interventions"].items():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["n"] == 4
        assert len(run["ci"]) == 2
        if name != "none":
            assert run["delta_vs_baseline"] is not None
    assert report["interventions"]["none"]["collapse"]["effective_rank"] >= 1.0
    assert report["throughput"]["none"]["tokens_per_s"] > 0
    for f in (
        "report.json",
        "report.md",
        "accuracy_by_intervention.png",
        "latent_cosine_heatmap.png",
    ):
        assert (tmp_path / f).exists()
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["n_eval"] == 4


def test_eval_cli_on_synthetic(tiny, tmp_path, capsys):
    model, processor = tiny
    save_pretrained(model, processor, tmp_path / "model")
    write_synthetic_dataset(tmp_path / "data", 3, seed=3)
    code = main(
        [
            "eval", "--model", str(tmp_path / "model"), "--bench", "synthetic",
            "--data", str(tmp_path / "data"), "--limit", "2", "--intervention", "none,zero",
            "--max-new-tokens", "4", "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "none" in out and "zero" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["bench"] == "synthetic" and report["meta"]["n_eval"] == 2


def test_eval_config_errors():
    with pytest.raises(ValueError, match="intervention must be one of"):
        EvalConfig(interventions="none,bogus")
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
