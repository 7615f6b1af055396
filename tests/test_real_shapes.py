"""Real shapes on CPU: Qwen2.5-VL-7B's attention geometry at two layers, fp32, random init.

`tiny_model(geometry="qwen2_5_vl_7b")`: hidden 3584, 28 query / 4 KV heads of 128, mRoPE
sections [16, 24, 24], rope theta 1e6; a vision tower 1280 wide with 16 heads of 80, windows of
112 px, patch 14, merge 2 — with 2 text layers, 2 vision blocks (windowed, then full) and narrow
MLPs. The tiny model (head_dim 16, mRoPE [2, 3, 3]) cannot show shape assumptions; these tests
run the stage-2/3 latent forward against the two-pass reference (values and gradients), the
Triton latent-attention kernel at head_dim 128 (GQA 28/4) and 80 on the real batch's mask,
`generate()` against the Python step loop, and one VLPO update — on a batch of two samples with
different layouts, small images (one spans two vision windows) and K = 2 latents.
`geometry="qwen3_vl_8b"` (hidden 4096, 32 query / 8 KV heads of an explicit head_dim 128,
q/k RMSNorm, interleaved mRoPE [24, 20, 20] at theta 5e6; vision 1152 wide, 16 heads of 72,
patch 16; a DeepStack level with the real 4608 -> 4096 merger) runs the config check, the
stage-2 forward against the reference, the kernel at head_dim 72 and `generate()`.
The stage-2 forward through "monet_latent" at these shapes is left out on purpose: the Triton
interpreter pays per program (B x 28 heads x query tiles, for every segment and layer),
~14 CPU-s; the kernel test below covers the kernel at these shapes and test_latent_forward.py
the model-level glue.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from monet_fast.data import collate
from monet_fast.data.types import Sample, Segment
from monet_fast.model import latent_forward
from monet_fast.model.latent_reference import reference_latent_forward
from monet_fast.model.sequence import render_prompt
from monet_fast.model.tiny import GEOMETRIES, tiny_model
from monet_fast.model.tokens import TokenIds

GEOMETRY = "qwen2_5_vl_7b"
GEOMETRIES_UNDER_TEST = (GEOMETRY, "qwen3_vl_8b")
K = 2

# ~115 s for the file on 2 busy cores (the Qwen3-VL-8B cases ~40 s of it): part of `make test`,
# not of `make test-fast`.
pytestmark = pytest.mark.slow


def _img(seed: int, width: int, height: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


# 140 x 56 px -> 10 x 4 patches -> 5 x 2 merged tokens: two 112-px windows (one partial).
WIDE = (140, 56)


def _samples() -> list[Sample]:
    """Two samples whose latent blocks sit at different positions (different text lengths,
    question image sizes), one question image wider than a vision window."""
    out = []
    for i, (size, words) in enumerate(((WIDE, 1), ((56, 56), 4))):
        out.append(
            Sample(
                question=[Segment("image", image=_img(i, *size)), Segment("text", text="color?")],
                reasoning=[
                    Segment("text", text="look" + " then" * words),
                    Segment("aux_image", image=_img(10 + i, 56, 56)),
                    Segment("observation", text="it is red"),
                    Segment("answer", text="\\boxed{A}"),
                ],
                answer="A",
                sample_id=str(i),
                system="Be brief.",
            )
        )
    return out


@pytest.fixture(scope="module")
def _built() -> dict:
    """Models built so far in this module, by geometry (each built once, freed at the end)."""
    return {}


@pytest.fixture(params=GEOMETRIES_UNDER_TEST)
def real(request, _built):
    """(model, processor) of one geometry. Tests pin a geometry with
    `@pytest.mark.parametrize("real", [...], indirect=True)`."""
    if request.param not in _built:
        _built[request.param] = tiny_model(0, geometry=request.param, latent_size=K)
    return _built[request.param]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(model, want: dict[str, torch.Tensor], atol: float, rtol: float) -> None:
    """Every parameter's .grad is close to `want` (same names). The cheap elementwise check runs
    first: assert_close on 130M gradient entries costs seconds on 2 cores; it runs only to
    report a failure."""
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, g in got.items():
        # `~(diff <= tol)` is also true where either side is NaN.
        if (~((g - want[name]).abs_() <= atol + rtol * want[name].abs())).any():
            torch.testing.assert_close(
                g, want[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("real", [GEOMETRY], indirect=True)
def test_config_has_the_7b_attention_geometry(real):
    model, processor = real
    text, vision = model.config.text_config, model.config.vision_config
    attn = model.model.language_model.layers[0].self_attn
    assert (attn.head_dim, text.num_attention_heads, text.num_key_value_heads) == (128, 28, 4)
    assert attn.q_proj.weight.shape == (3584, 3584) and attn.k_proj.weight.shape == (512, 3584)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert model.model.language_model.rotary_emb.inv_freq.numel() == 64  # head_dim / 2
    blk = model.model.visual.blocks[0].attn
    assert (blk.num_heads, blk.head_dim, blk.qkv.weight.shape) == (16, 80, (3840, 1280))
    assert vision.fullatt_block_indexes == [1] and vision.window_size == 112
    assert model.model.visual.merger.mlp[-1].weight.shape == (3584, 5120)
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    # The wide image spans two windows of block 0 (windowed): 10 patches = 5 merged tokens
    # across, a window is 112 / 14 / 2 = 4 merged tokens.
    grid = processor.image_processor(images=[_img(0, *WIDE)], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 10]]
    window = vision.window_size // vision.patch_size // vision.spatial_merge_size
    assert -(-10 // vision.spatial_merge_size // window) == 2
    with pytest.raises(ValueError, match="geometry must be one of"):
        tiny_model(0, geometry="qwen2_5_vl_70b")
    assert GEOMETRY in GEOMETRIES


@pytest.mark.parametrize("real", ["qwen3_vl_8b"], indirect=True)
def test_config_has_the_qwen3_vl_8b_attention_geometry(real):
    """Qwen3-VL-8B: 32 query / 8 KV heads of an explicit head_dim 128 with q/k RMSNorm,
    interleaved mRoPE [24, 20, 20] at theta 5e6, a vision tower 1152 wide (16 heads of 72, patch
    16, 48 x 48 learned positions) and a DeepStack level (a 4608 -> 4096 merger) feeding
    decoder layer 0, which layer 1 then reads."""
    model, processor = real
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert processor.model_type == "qwen3_vl"
    text, vision = model.config.text_config, model.config.vision_config
    attn = model.model.language_model.layers[0].self_attn
    assert (attn.head_dim, text.num_attention_heads, text.num_key_value_heads) == (128, 32, 8)
    assert text.head_dim == 128 and text.hidden_size == 4096
    assert attn.q_proj.weight.shape == (4096, 4096) and attn.k_proj.weight.shape == (1024, 4096)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (128,)
    rope = text.rope_parameters
    assert rope["mrope_section"] == [24, 20, 20] and rope["mrope_interleaved"] is True
    assert rope["rope_theta"] == 5e6
    assert model.model.language_model.rotary_emb.inv_freq.numel() == 64  # head_dim / 2
    blk = model.model.visual.blocks[0].attn
    assert (blk.num_heads, blk.head_dim, blk.qkv.weight.shape) == (16, 72, (3456, 1152))
    assert model.model.visual.pos_embed.weight.shape == (2304, 1152)
    assert vision.deepstack_visual_indexes == [0] and text.num_hidden_layers == 2
    mergers = [model.model.visual.merger, *model.model.visual.deepstack_merger_list]
    assert [m.linear_fc2.weight.shape for m in mergers] == [(4096, 4608)] * 2
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (16, 2, 2)
    # 140 x 56 px -> 128 x 64 (multiples of 32 px) -> 4 x 8 patches of 16 px -> 2 x 4 tokens.
    grid = processor.image_processor(images=[_img(0, *WIDE)], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8]]
    with pytest.raises(ValueError, match="is a 'qwen3_vl' model, got arch='qwen2_5_vl'"):
        tiny_model(0, geometry="qwen3_vl_8b", arch="qwen2_5_vl")


# Qwen3-VL-8B runs stage 2 only (~30 CPU-s a stage): its aux images sit between latent blocks,
# so DeepStack features reach image tokens in several segments.
@pytest.mark.parametrize(
    "real, stage",
    [(GEOMETRY, "stage2"), (GEOMETRY, "stage3"), ("qwen3_vl_8b", "stage2")],
    indirect=["real"],
)
def test_latent_forward_equals_two_pass_reference(real, stage):
    """Batched one-pass latent forward == the per-sample two-pass reference (consistent mask,
    no detach), values and gradients of every parameter (vision tower included)."""
    model, processor = real
    batch = collate(_samples(), processor, stage, latent_size=K)
    # The two samples place their latent block at different positions (inner padding).
    assert len({lay.slot_positions[0] for lay in batch.layouts}) == 2
    # Teacher targets: all-layer states at the observation tokens (stage 2) or latent slots
    # (stage 3), [layers + 1, n, hidden] per sample; random values suffice for a comparison.
    g = torch.Generator().manual_seed(1)
    layers = model.config.text_config.num_hidden_layers
    hidden = model.config.text_config.hidden_size
    teacher = [
        torch.randn(
            layers + 1,
            len(lay.observation_positions if stage == "stage2" else lay.slot_positions),
            hidden,
            generator=g,
        )
        for lay in batch.layouts
    ]
    try:
        model.zero_grad()
        ref = reference_latent_forward(
            model, batch, teacher=teacher, mask_mode="consistent", detach_latent_inputs=False
        )
        ref.loss.backward()
        ref_grads = _grads(model)
        assert any(n.startswith("model.visual.") for n in ref_grads)  # the images reach the loss
        for level in getattr(model.model.visual, "deepstack_merger_list", ()):
            # Each DeepStack level reaches the loss (through the decoder layer it feeds).
            grad = level.linear_fc2.weight.grad
            assert grad is not None and grad.abs().max() > 0

        model.zero_grad()
        ours = latent_forward(model, batch, teacher=teacher)
        ours.loss.backward()
        for a, b in zip(ours.latents, ref.latents):
            assert a.shape == (K, hidden)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.ce_loss, ref.ce_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.align_loss, ref.align_loss, atol=1e-5, rtol=1e-5)
        # Measured margin: the worst gradient entry is ~25x (7B), ~37x (8B) inside this tolerance.
        _assert_grads_close(model, ref_grads, atol=1e-5, rtol=1e-3)
    finally:
        model.zero_grad()


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, head_dim",
    [(28, 4, 128), (16, 16, 80), (16, 16, 72)],
    ids=["text-128-gqa7", "vision-80", "qwen3-8b-vision-72"],
)
def test_latent_attention_kernel_at_real_head_shapes(n_heads, n_kv_heads, head_dim):
    """Triton latent attention == the dense-mask SDPA reference, forward and backward, at the
    7B's text heads (128, 28 query / 4 KV) and its vision head size (80, BLOCK_D 128 with the
    upper 48 lanes masked) and Qwen3-VL-8B's vision head size (72), on the stage-2 mask and right padding of the real batch, with
    q/k/v as HF passes them (strided views of [B, S, H, D])."""
    from monet_fast.kernels.latent_attention import latent_attention, latent_attention_reference

    from monet_fast.model.tiny import tiny_processor

    batch = collate(_samples(), tiny_processor(), "stage2", latent_size=K)
    mr, kv_lens = batch.masked_rows, batch.attention_mask.sum(1)
    B, S = batch.input_ids.shape
    assert kv_lens.min() < S  # one row is padded
    g = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(B, S, h, head_dim, generator=g).requires_grad_()
        for h in (n_heads, n_kv_heads, n_kv_heads)
    ]
    dout = torch.randn(B, n_heads, S, head_dim, generator=g)
    results = []
    for fn in (latent_attention, latent_attention_reference):
        q, k, v = (t.transpose(1, 2) for t in leaves)  # [B, H, S, D] views
        out = fn(q, k, v, mr, 0, kv_lens)
        grads = torch.autograd.grad(out, leaves, dout)
        results.append((out, *grads))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def _start_at(start_id: int, index: int, vocab: int):
    """Graph-safe logits processor: START gets a large bonus at output index `index` (every row);
    no host sync, no data-dependent shapes."""
    bonus = torch.zeros(vocab)
    bonus[start_id] = 1e6

    def processor(logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        hit = (position == index).to(logits.dtype)[:, None]
        return logits + hit * bonus[: logits.shape[-1]].to(logits.device)

    return processor


def _prompts() -> list[dict]:
    return [{"text": render_prompt(s), "images": list(s.question_images)} for s in _samples()]


def test_generate_equals_python_step_loop(real):
    """Latent decoding (sft layout, greedy, START forced at output index 1 so both rows run a
    latent block) == the Python step loop: tokens, latent counts and latent vectors."""
    from monet_fast.decode import generate
    from monet_fast.decode.pyloop import generate_python_loop

    model, processor = real
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    proc = _start_at(tid.latent_start, 1, model.config.text_config.vocab_size)
    kwargs = dict(
        max_new_tokens=6,
        logits_processor=proc,
        return_latents=True,
        latent_size=K,
        latent_layout="sft",
    )
    ours = generate(model, processor, _prompts(), **kwargs)
    loop = generate_python_loop(model, processor, _prompts(), **kwargs)
    assert [s.tolist() for s in ours.sequences] == [s.tolist() for s in loop.sequences]
    assert ours.latent_counts == loop.latent_counts
    assert all(counts and counts[0] >= 1 for counts in ours.latent_counts)
    for a, b in zip(ours.latents, loop.latents):
        assert a.shape[-1] == model.config.text_config.hidden_size and a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Different prompts (layouts) give different latents.
    assert not torch.allclose(ours.latents[0], ours.latents[1], atol=1e-3)


# The 7B only: past the forward (covered above for both) the update is architecture-agnostic,
# and test_arch.py runs VLPO on the tiny Qwen3-VL.
@pytest.mark.parametrize("real", [GEOMETRY], indirect=True)
def test_one_vlpo_update(real):
    """Rollouts from generate() -> replay batch -> VLPO objective (token and latent terms) ->
    backward -> one SGD step; finite, non-zero gradients. (That an update moves the replayed
    log-probs is checked on the tiny model in test_vlpo_recipe; a second forward here costs
    ~3 CPU-s.)"""
    from monet_fast.train.rollout import (
        BanTokens,
        build_replay_batch,
        default_ban_ids,
        generate_rollouts,
    )
    from monet_fast.train.vlpo_config import ObjectiveSection
    from monet_fast.train.vlpo_module import VLPOTrainModule

    model, processor = real
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    opener = _start_at(tid.latent_start, 1, model.config.text_config.vocab_size)

    def rollout_processor(logits, position):
        return opener(ban(logits, position), position)

    rollouts = generate_rollouts(
        model,
        processor,
        _samples()[:1],
        group_size=2,
        max_new_tokens=6,
        latent_size=K,
        temperature=0.7,
        top_p=0.99,
        seed=3,
        ban=rollout_processor,
    )
    for r, a in zip(rollouts, (1.0, -1.0)):
        r.advantage = a
    rb = build_replay_batch(rollouts, processor, K)
    assert rb.n_latent_steps > 0 and rb.n_token_steps > 0
    module = VLPOTrainModule(model, ObjectiveSection(), 0.7, ban)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        model.zero_grad()
        # old=None: this forward's own log-probs are the pre-update ones (ratio exactly 1).
        out = module(rb, None, None, scale=1.0 / rb.n_steps)
        terms = {t.kind: t for t in out["terms"]}
        assert terms.keys() == {"token", "latent"}
        # Rollout latents are the Gaussian means: the replayed mu reproduces them.
        assert terms["latent"].logp.abs().max() < 1e-6
        out["objective"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        q_proj = model.get_parameter("model.language_model.layers.1.self_attn.q_proj.weight")
        assert q_proj.grad.abs().max() > 0
        with torch.no_grad():  # the update: plain SGD
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
        assert not torch.equal(
            q_proj, saved["model.language_model.layers.1.self_attn.q_proj.weight"]
        )
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        model.zero_grad()
