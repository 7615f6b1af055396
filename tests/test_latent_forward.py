"""Batched one-pass latent forward vs stock HF, a no-cache recompute loop and the two-pass
reference (values and gradients), on the tiny model."""

import dataclasses

import pytest
import torch
from PIL import Image

from monet_fast.data import collate
from monet_fast.data.types import Sample, Segment
from monet_fast.model import latent_forward
from monet_fast.model.latent import embed_inputs
from monet_fast.model.latent_reference import reference_latent_forward
from monet_fast.model.losses import LossConfig
from monet_fast.model.sequence import allowed_mask
from monet_fast.model.tiny import tiny_model

K = 3


def _img(seed: int, size: int = 56) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def make_sample(seed: int, n_aux: int, words: int = 2) -> Sample:
    """A sample with `n_aux` aux images, each followed by an observation."""
    reasoning = [Segment("text", text="look " * words)]
    for i in range(n_aux):
        reasoning += [
            Segment("aux_image", image=_img(100 + seed * 10 + i)),
            Segment("observation", text=f"the object is red {i}"),
            Segment("text", text=" then" * (seed % 3 + 1)),
        ]
    reasoning.append(Segment("answer", text="\\boxed{A}"))
    return Sample(
        question=[
            Segment("image", image=_img(seed, 56 + 28 * (seed % 2))),
            Segment("text", text="what color? " * (1 + seed % 2)),
        ],
        reasoning=reasoning,
        answer="A",
        sample_id=str(seed),
    )


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model(seed=0)
    return model.float(), processor


def _teacher(out_states, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=g) for s in out_states]


def test_no_latent_logits_equal_stock_hf(tiny_arch):
    # Qwen3-VL: also checks DeepStack (the stock forward adds per-layer visual features).
    _, model, processor = tiny_arch
    samples = [make_sample(0, 1), make_sample(1, 1, words=5)]
    batch = collate(samples, processor, "stage1")
    out = latent_forward(model, batch, return_logits=True)
    with torch.no_grad():
        ref = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=batch.mm_token_type_ids,
        ).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert out.latents[0].shape == (0, model.config.text_config.hidden_size)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_latents_equal_no_cache_recompute(tiny, stage):
    model, processor = tiny
    samples = [make_sample(0, 1), make_sample(3, 2)]
    batch = collate(samples, processor, stage, latent_size=K)
    with torch.no_grad():
        out = latent_forward(model, batch)
        embeds = embed_inputs(model, batch)
        dense = allowed_mask(batch.masked_rows, batch.input_ids.shape[1], batch.attention_mask)
        lm = model.model.language_model
        for b, lay in enumerate(batch.layouts):
            x = embeds[b : b + 1].clone()
            naive = []
            for p in lay.slot_positions:
                # Recompute the whole prefix without a cache, then feed the hidden state back.
                allowed = dense[b : b + 1, :, :p, :p]
                mask = torch.zeros(allowed.shape).masked_fill(
                    ~allowed, torch.finfo(torch.float32).min
                )
                h = lm(
                    inputs_embeds=x[:, :p],
                    position_ids=batch.position_ids[:, b : b + 1, :p],
                    attention_mask=mask,
                ).last_hidden_state
                x[0, p] = h[0, -1]
                naive.append(h[0, -1])
            torch.testing.assert_close(out.latents[b], torch.stack(naive), atol=1e-4, rtol=1e-4)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_batched_equals_two_pass_reference(tiny_arch, stage):
    _, model, processor = tiny_arch
    samples = [make_sample(0, 1), make_sample(1, 2, words=4), make_sample(2, 1, words=1)]
    batch = collate(samples, processor, stage, latent_size=K)
    with torch.no_grad():
        states = latent_forward(model, batch, return_states=True)
    teacher = _teacher(states.obs_states if stage == "stage2" else states.slot_states)

    model.zero_grad()
    ours = latent_forward(model, batch, teacher=teacher)
    ours.loss.backward()
    g_ours = _grads(model)
    model.zero_grad()
    ref = reference_latent_forward(
        model, batch, teacher=teacher, mask_mode="consistent", detach_latent_inputs=False
    )
    ref.loss.backward()
    g_ref = _grads(model)
    model.zero_grad()

    for a, b in zip(ours.latents, ref.latents):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.ce_loss, ref.ce_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.align_loss, ref.align_loss, atol=1e-5, rtol=1e-5)
    assert ours.n_target_tokens == ref.n_target_tokens
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 0
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)


def test_stage2_alignment_reaches_parameters_only_through_latents(tiny):
    model, processor = tiny
    batch = collate([make_sample(0, 1)], processor, "stage2", latent_size=K)
    with torch.no_grad():
        teacher = _teacher(latent_forward(model, batch, return_states=True).obs_states)
    ids = batch.input_ids[0].tolist()
    lay = batch.layouts[0]
    first_slot = lay.slot_positions[0]
    # Tokens that occur only after the latent block: the latents cannot depend on them.
    late = {ids[p] for p in lay.observation_positions} - set(ids[:first_slot])
    assert late

    def align_grad(cfg):
        model.zero_grad()
        out = latent_forward(model, batch, teacher=teacher, loss_config=cfg)
        (out.loss - out.ce_loss).backward()  # the alignment part only
        grads = _grads(model)
        model.zero_grad()
        return out, grads

    out, via_latents = align_grad(LossConfig())
    assert out.align_loss > 0
    assert "lm_head.weight" not in via_latents or via_latents["lm_head.weight"].abs().max() == 0
    rows = via_latents.get("model.language_model.embed_tokens.weight")
    assert rows is None or rows[sorted(late)].abs().max() == 0
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert via_latents[q].abs().max() > 0
    # Without the proxy (weight 0) alignment back-propagates everywhere, late tokens included.
    _, full = align_grad(LossConfig(latent_proxy_weight=0.0))
    assert full["model.language_model.embed_tokens.weight"][sorted(late)].abs().max() > 0


def test_reference_mask_mode_changes_latents(tiny):
    model, processor = tiny
    batch = collate([make_sample(0, 1)], processor, "stage2", latent_size=K)
    with torch.no_grad():
        a = reference_latent_forward(model, batch, mask_mode="reference").latents[0]
        b = reference_latent_forward(model, batch, mask_mode="consistent").latents[0]
        c = latent_forward(model, batch).latents[0]
    torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)


def test_mixed_batch_equals_each_sample_alone(tiny):
    model, processor = tiny
    samples = [make_sample(0, 0), make_sample(1, 2, words=6), make_sample(2, 1)]
    with torch.no_grad():
        together = latent_forward(model, collate(samples, processor, "stage2", latent_size=K))
        for i, s in enumerate(samples):
            alone = latent_forward(model, collate([s], processor, "stage2", latent_size=K))
            torch.testing.assert_close(together.latents[i], alone.latents[0], atol=1e-5, rtol=1e-4)
    # Token-level normalisation: the batch CE is the weight-summed CE of its parts.
    with torch.no_grad():
        parts = [
            latent_forward(model, collate([s], processor, "stage2", latent_size=K)) for s in samples
        ]
    total = sum(p.ce_sum for p in parts) / sum(p.ce_weight for p in parts)
    torch.testing.assert_close(together.ce_loss, total, atol=1e-5, rtol=1e-5)


def test_bad_teacher_and_latents_are_clear_errors(tiny):
    model, processor = tiny
    batch = collate([make_sample(0, 1)], processor, "stage2", latent_size=K)
    with torch.no_grad():
        states = latent_forward(model, batch, return_states=True).obs_states
        with pytest.raises(ValueError, match="sample synthetic_0: teacher has"):
            latent_forward(model, batch, teacher=[states[0][:, :-1]])
        with pytest.raises(ValueError, match="teacher has 2 entries"):
            latent_forward(model, batch, teacher=states * 2)
        with pytest.raises(ValueError, match="latents must be"):
            latent_forward(model, batch, latents=[torch.zeros(K + 1, 64)])
        wrong_k = dataclasses.replace(batch, latent_size=K + 1)
        with pytest.raises(ValueError, match="expected latent_size=4"):
            latent_forward(model, wrong_k)


def test_given_latents_are_fed(tiny):
    model, processor = tiny
    batch = collate([make_sample(0, 1)], processor, "stage3", latent_size=K)
    z = torch.randn(K, model.config.text_config.hidden_size)
    with torch.no_grad():
        out = latent_forward(model, batch, latents=[z], return_states=True)
    torch.testing.assert_close(out.latents[0], z)
    torch.testing.assert_close(out.slot_states[0][0], z)  # layer 0 = the input embedding


@pytest.mark.slow
def test_triton_latent_attention_path_equals_dense_sdpa(tiny):
    """With "monet_latent" (Triton kernel, compact mask) the forward and gradients equal the
    dense-mask SDPA path; mixed layouts exercise inner padding columns."""
    _triton_equals_sdpa(*tiny)


@pytest.mark.slow
def test_triton_latent_attention_path_equals_dense_sdpa_qwen3_vl():
    """The same on Qwen3-VL (q/k norms, interleaved mRoPE, DeepStack between segments)."""
    model, processor = tiny_model(seed=0, arch="qwen3_vl")
    _triton_equals_sdpa(model, processor)


def _triton_equals_sdpa(model, processor) -> None:
    import copy

    from monet_fast.model.attention import use_latent_attention

    fast = use_latent_attention(copy.deepcopy(model))
    samples = [make_sample(0, 1), make_sample(1, 2, words=4)]
    batch = collate(samples, processor, "stage2", latent_size=K)
    with torch.no_grad():
        teacher = _teacher(latent_forward(model, batch, return_states=True).obs_states)
    outs, grads = [], []
    for m in (model, fast):
        m.zero_grad()
        out = latent_forward(m, batch, teacher=teacher)
        out.loss.backward()
        outs.append(out)
        grads.append(_grads(m))
        m.zero_grad()
    for a, b in zip(outs[0].latents, outs[1].latents):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_latent_forward_benchmark_cli(tmp_path, capsys):
    """`monet-fast bench latent-forward --quick --json`: both providers per configuration, the
    reference row at speed-up 1 and the batched row's speed-up consistent with its timing."""
    import json

    from monet_fast.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "latent-forward", "--quick", "--json", str(out)]) == 0
    assert "two_pass_reference" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    configs = {r["config"] for r in rows}
    assert {"tiny stage2 B=8", "tiny stage3 B=8"} <= configs
    for config in configs:
        by = {r["provider"]: r for r in rows if r["config"] == config}
        assert by["two_pass_reference"]["speedup"] == 1.0
        ratio = by["two_pass_reference"]["seconds"] / by["batched"]["seconds"]
        assert abs(by["batched"]["speedup"] - ratio) < 1e-9
