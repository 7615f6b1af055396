"""Latent-mask attention: Triton kernels (interpreter on CPU) vs SDPA with the dense mask, tile
classification, the transformers registration on a tiny Qwen2.5-VL, and a GPU compile check.

The reference is `latent_attention_reference` (SDPA + `dense_mask`) in the kernel module; the
stage-2 rule it expands is REFERENCE.md §3.3 (oracle 6 in §8 is checked first).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from monet_fast.kernels.latent_attention import (
    dense_mask,
    latent_attention,
    latent_attention_reference,
)
from monet_fast.kernels.latent_mask_plan import FULL, PARTIAL, ROW_END, SKIP, LatentMaskPlan

from monet_fast.bench.latent_attention import allowed_pairs, stage2_masked_rows

# `monet_fast.kernels.latent_attention` as an attribute is the re-exported function.
la = importlib.import_module("monet_fast.kernels.latent_attention")

# Kernel tests run on the GPU when there is one, else under the Triton interpreter (conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype, (atol, rtol) for the output, (atol, rtol) for gradients, against an fp32 reference on
# the same (rounded) inputs. 16-bit: P is cast to the input dtype before the P @ V and dS @ K
# products (as FlashAttention does), so errors are those of a 16-bit matmul input.
TOLERANCES = {
    torch.float32: ((2e-5, 1e-5), (5e-5, 1e-5)),
    torch.float16: ((5e-3, 1e-2), (1e-2, 1e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 3e-2)),
}


def random_masked_rows(batch: int, seq_len: int, layout: str, seed: int = 0) -> torch.Tensor:
    """Random masked-row intervals [B, L, 4] int32.

    "stage2": aux-image pad columns j with slots [a0, a1) -> (j, a0, a1, L), a few images of
    random size at random places (REFERENCE.md §3.3). "general": arbitrary intervals on half of
    the columns, including empty (r0 >= r1), overlapping and out-of-range ones.
    """
    gen = torch.Generator().manual_seed(seed)

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    mr = torch.zeros(batch, seq_len, 4, dtype=torch.int32)
    for b in range(batch):
        if layout == "general":
            cols = torch.randperm(seq_len, generator=gen)[: seq_len // 2]
            mr[b, cols] = torch.randint(-3, seq_len + 4, (len(cols), 4), generator=gen, dtype=torch.int32)  # fmt: skip
            continue
        pos = rint(0, seq_len // 4)
        while True:
            i0 = pos + rint(0, 4)
            n_img = rint(1, max(seq_len // 4, 2))
            a0 = i0 + n_img + rint(0, 3)
            a1 = a0 + rint(1, 7)
            if a1 > seq_len:
                break
            j = torch.arange(i0, i0 + n_img, dtype=torch.int32)
            mr[b, i0 : i0 + n_img] = torch.stack([j, torch.full_like(j, a0), torch.full_like(j, a1), torch.full_like(j, seq_len)], -1)  # fmt: skip
            pos = a1 + rint(0, 5)
    return mr


def qkv(batch, n_heads, n_kv_heads, n_q, n_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, n_q, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v


def check_against_reference(q, k, v, masked_rows=None, q_offset=0, kv_lens=None, block_sizes=None):
    """Forward and q/k/v gradients of the kernel vs the fp32 reference; returns (out, grads)."""
    (o_atol, o_rtol), (g_atol, g_rtol) = TOLERANCES[q.dtype]
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = latent_attention(q, k, v, masked_rows, q_offset, kv_lens, block_sizes=block_sizes)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(
        q.device, q.dtype
    )
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    rq, rk, rv = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = latent_attention_reference(rq, rk, rv, masked_rows, q_offset, kv_lens)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), grad_out.float())

    assert out.dtype == q.dtype and out.shape == q.shape
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out.float(), ref, atol=o_atol, rtol=o_rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, atol=g_atol, rtol=g_rtol, msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip
    return out, grads


def test_dense_mask_matches_reference_oracle():
    """REFERENCE.md §8 oracle 6: I = [6, 7], A = [10, 11], L = 17."""
    L = 17
    mr = torch.zeros(1, L, 4, dtype=torch.int32)
    for j in (6, 7):
        mr[0, j] = torch.tensor([j, 10, 12, L])
    allowed = dense_mask(mr, L, L)
    assert allowed.shape == (1, 1, L, L) and allowed.dtype == torch.bool
    expect = {
        6: set(range(6)),
        7: set(range(6)),
        8: set(range(6)) | {8},
        9: set(range(6)) | {8, 9},
        10: set(range(11)),
        11: set(range(12)),
        12: set(range(6)) | set(range(8, 13)),
        16: set(range(6)) | set(range(8, 17)),
    }
    for row, cols in expect.items():
        assert set(allowed[0, 0, row].nonzero().flatten().tolist()) == cols, row
    off = allowed[0, 0].clone()
    off[:, 6:8] = False
    assert torch.equal(off, torch.ones(L, L, dtype=torch.bool).tril() & ~torch.isin(torch.arange(L), torch.tensor([6, 7]))[None, :])  # fmt: skip


# layout, (B, Hq, Hkv, S, D), dtype, block_sizes (None = interpreter default 32 x 32)
GRID = [
    ("stage2", (2, 4, 2, 70, 64), torch.float32, None),
    ("stage2", (1, 4, 2, 70, 64), torch.float16, (16, 16)),
    ("stage2", (1, 3, 1, 77, 80), torch.bfloat16, (32, 16)),
    ("general", (2, 2, 2, 45, 64), torch.float32, (16, 32)),
    ("general", (2, 4, 1, 53, 96), torch.float16, None),
    ("stage2", (1, 2, 1, 40, 128), torch.float32, (16, 16)),
    ("causal", (2, 4, 2, 33, 64), torch.float16, (16, 16)),
]


@pytest.mark.parametrize("layout, shape, dtype, block_sizes", GRID, ids=lambda x: str(x).replace(" ", "").removeprefix("torch."))  # fmt: skip
def test_matches_sdpa_with_dense_mask(layout, shape, dtype, block_sizes):
    B, Hq, Hkv, S, D = shape
    q, k, v = qkv(B, Hq, Hkv, S, S, D, dtype)
    mr = None if layout == "causal" else random_masked_rows(B, S, layout, seed=S)
    check_against_reference(q, k, v, mr, block_sizes=block_sizes)


def test_right_padding_with_kv_lens():
    B, S = 3, 61
    q, k, v = qkv(B, 4, 2, S, S, 64, torch.float16)
    mr = random_masked_rows(B, S, "stage2", seed=3)
    kv_lens = torch.tensor([S, S - 13, 20])
    check_against_reference(q, k, v, mr, kv_lens=kv_lens, block_sizes=(16, 16))
    check_against_reference(q, k, v, None, kv_lens=kv_lens)  # padding without a latent mask


@pytest.mark.parametrize("prefix, n_q, n_total", [(23, 41, 64), (30, 25, 80), (50, 1, 64)])
def test_chunk_after_kv_cache(prefix, n_q, n_total):
    """Queries at q_offset..q_offset+Sq-1 over Sk = prefix + Sq keys, with the whole-sequence
    masked_rows (only the first Sk columns are read): equal to those rows of a full pass."""
    B, n_k = 2, prefix + n_q
    q, k, v = qkv(B, 4, 2, n_total, n_total, 64, torch.float32, seed=prefix)
    mr = random_masked_rows(B, n_total, "stage2", seed=n_total)
    out, _ = check_against_reference(q[:, :, prefix:n_k], k[:, :, :n_k], v[:, :, :n_k], mr, q_offset=prefix, block_sizes=(16, 16))  # fmt: skip
    full = latent_attention_reference(q, k, v, mr)[:, :, prefix:n_k]
    torch.testing.assert_close(out, full, atol=2e-5, rtol=1e-5)


def test_rows_without_allowed_keys_are_zero():
    B, S = 2, 37
    q, k, v = qkv(B, 2, 1, S, S, 64, torch.float32)
    mr = torch.zeros(B, S, 4, dtype=torch.int32)
    mr[:, :, 0], mr[:, :, 1] = 5, 10  # rows 5..9 may see no key at all
    mr[0, :, 2], mr[0, :, 3] = 30, ROW_END  # and rows 30.. of sample 0
    kv_lens = torch.tensor([S, 0])  # sample 1 has no valid key: every row is empty
    out, (dq, dk, dv) = check_against_reference(q, k, v, mr, kv_lens=kv_lens, block_sizes=(16, 16))  # fmt: skip
    assert out[:, :, 5:10].abs().max() == 0 and out[0, :, 30:].abs().max() == 0
    assert out[1].abs().max() == 0
    assert dq[:, :, 5:10].abs().max() == 0 and dq[1].abs().max() == 0
    assert dk[1].abs().max() == 0 and dv[1].abs().max() == 0


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 64)])
@pytest.mark.parametrize("q_offset, with_kv_lens", [(0, False), (9, True)])
def test_tile_classes_agree_with_dense_mask(block_m, block_n, q_offset, with_kv_lens):
    B, n_q = 3, 83
    n_k = n_q + q_offset
    mr = random_masked_rows(B, n_k, "stage2", seed=block_m + block_n)
    mr[2] = random_masked_rows(1, n_k, "general", seed=5)[0]
    kv_lens = torch.tensor([n_k, n_k - 20, n_k - 3]) if with_kv_lens else None
    plan = LatentMaskPlan(mr, kv_lens, B, n_q, n_k, q_offset, "cpu")
    classes = plan.tile_classes(block_m, block_n)
    allowed = dense_mask(mr, n_q, n_k, q_offset, kv_lens)[:, 0]
    for b in range(B):
        for m in range(classes.shape[1]):
            for n in range(classes.shape[2]):
                tile = allowed[b, m * block_m : (m + 1) * block_m, n * block_n : (n + 1) * block_n]
                if classes[b, m, n] == SKIP:
                    assert not tile.any(), (b, m, n)
                elif classes[b, m, n] == FULL:
                    assert tile.all() and (n + 1) * block_n <= n_k, (b, m, n)
    lists = plan.tile_lists(block_m, block_n)
    assert torch.equal(lists.full_cnt, (classes == FULL).sum(-1, dtype=torch.int32))
    first = lists.full_idx.gather(-1, (lists.full_cnt.long() - 1).clamp(min=0)[..., None])[..., 0]
    assert ((classes.gather(-1, first.long()[..., None])[..., 0] == FULL) | (lists.full_cnt == 0)).all()  # fmt: skip


def test_stage2_layout_skips_hidden_image_tiles():
    """Below the diagonal, tiles of aux-image columns are skipped for rows outside the slots and
    fully computed (no mask arithmetic) for the slot rows."""
    L, img, a0, a1 = 128, (32, 64), 80, 96
    mr = torch.zeros(1, L, 4, dtype=torch.int32)
    j = torch.arange(*img, dtype=torch.int32)
    mr[0, img[0] : img[1]] = torch.stack([j, torch.full_like(j, a0), torch.full_like(j, a1), torch.full_like(j, L)], -1)  # fmt: skip
    classes = LatentMaskPlan(mr, None, 1, L, L, 0, "cpu").tile_classes(16, 16)[0]
    image_cols = slice(img[0] // 16, img[1] // 16)
    assert (classes[img[1] // 16 : a0 // 16, image_cols] == SKIP).all()  # after the image
    assert (classes[a0 // 16 : a1 // 16, image_cols] == FULL).all()  # the latent slots
    assert (classes[a1 // 16 :, image_cols] == SKIP).all()  # after the slots
    assert (classes[a1 // 16 :, : img[0] // 16] == FULL).all()  # text before the image
    # A key tile mixing text and image columns is still full for the slot rows.
    mr[0, 32:40] = 0
    classes = LatentMaskPlan(mr, None, 1, L, L, 0, "cpu").tile_classes(16, 16)[0]
    assert (classes[a0 // 16 : a1 // 16, image_cols] == FULL).all()
    assert classes[a1 // 16, 32 // 16] == PARTIAL


def test_hf_layout_views_keep_their_strides():
    """HF passes q/k/v as [B, S, H, D] memory viewed as [B, H, S, D]; the output keeps q's
    layout, so the attention wrapper's transpose back is free."""
    B, S = 2, 40
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(B, 4, 2, S, S, 64, torch.float32))  # fmt: skip
    mr = random_masked_rows(B, S, "stage2", seed=7)
    out, _ = check_against_reference(q, k, v, mr)
    assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()


def test_plan_is_reused_across_calls_and_invalidated_in_place():
    B, S = 1, 40
    q, k, v = qkv(B, 2, 2, S, S, 64, torch.float32)
    mr = random_masked_rows(B, S, "stage2", seed=2)
    plan = la._get_plan(mr, None, B, S, S, 0, "cpu")
    assert la._get_plan(mr, None, B, S, S, 0, "cpu") is plan
    assert la._get_plan(mr.clone(), None, B, S, S, 0, "cpu") is not plan
    mr[0, :, 0], mr[0, :, 1] = 0, ROW_END  # in place: every key hidden from every row
    assert la._get_plan(mr, None, B, S, S, 0, "cpu") is not plan
    assert latent_attention(q, k, v, mr).abs().max() == 0


def test_inference_mode_tensors(tiny_models):
    """Inference tensors have no version counter: no plan memo, same results."""
    q, k, v = qkv(1, 2, 1, 30, 30, 64, torch.float32)
    with torch.inference_mode():
        mr = random_masked_rows(1, 30, "stage2", seed=4)
        out = latent_attention(q, k, v, mr)
        torch.testing.assert_close(out, latent_attention_reference(q, k, v, mr), atol=2e-5, rtol=1e-5)  # fmt: skip
        _, lat = tiny_models
        inputs, mr = tiny_batch()
        valid = inputs["attention_mask"].bool()
        got = lat(**inputs, masked_rows=mr).logits
        torch.testing.assert_close(got[valid], lat(**inputs, masked_rows=mr.clone()).logits[valid])


def test_falls_back_to_reference_without_triton_backend(monkeypatch):
    """CPU tensors without TRITON_INTERPRET run the torch reference (SDPA + dense mask)."""
    monkeypatch.setattr(la, "_interpreting", lambda: False)

    def no_kernel(*args):
        raise AssertionError("the Triton path must not run")

    monkeypatch.setattr(la, "_apply_kernels", no_kernel)
    q, k, v = qkv(2, 4, 2, 30, 30, 64, torch.float32)
    mr = random_masked_rows(2, 30, "stage2")
    torch.testing.assert_close(latent_attention(q, k, v, mr, kv_lens=torch.tensor([30, 17])), latent_attention_reference(q, k, v, mr, kv_lens=torch.tensor([30, 17])))  # fmt: skip


def test_rejects_bad_shapes_and_dtypes():
    q, k, v = qkv(1, 3, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        latent_attention(q, k, v)
    q, k, v = qkv(1, 2, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        latent_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="masked_rows"):
        latent_attention(q, k, v, torch.zeros(1, 5, 4, dtype=torch.int32))


def test_bench_layout_and_pair_count():
    """The benchmark's stage-2 layout runs through the kernel; its O(L) pair count is exact."""
    mr = stage2_masked_rows(2, 96, seed=1)
    q, k, v = qkv(2, 4, 2, 96, 96, 64, torch.float16)
    out = latent_attention(q, k, v, mr)
    torch.testing.assert_close(out.float(), latent_attention_reference(q.float(), k.float(), v.float(), mr), atol=5e-3, rtol=1e-2)  # fmt: skip
    for q_offset, n_q in ((0, 96), (40, 56)):
        assert allowed_pairs(mr, n_q, 96, q_offset) == int(dense_mask(mr, n_q, 96, q_offset).sum())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_flex_block_mask_is_the_same_rule():
    """The FlexAttention baseline masks exactly what the kernel masks (eager forward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from monet_fast.bench.latent_attention import _flex_block_mask

    L = 128
    mr = stage2_masked_rows(2, L, seed=3)
    q, k, v = qkv(2, 4, 2, L, L, 64, torch.float32)
    out = flex_attention(q, k, v, block_mask=_flex_block_mask(mr, L, L), enable_gqa=True)
    torch.testing.assert_close(out, latent_attention_reference(q, k, v, mr), atol=2e-5, rtol=1e-5)


def test_bench_skips_on_cpu_with_a_reason():
    from monet_fast.bench import run_benchmark

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    report = run_benchmark("latent-attention", quick=True)
    assert report.skipped and "FlexAttention" in report.skipped and not report.rows


# GPU compile checks of every kernel variant (no GPU needed): tests/test_kernel_check.py.


@pytest.mark.parametrize("head_dim, dtype", [(80, torch.float32), (80, torch.float16), (8, torch.float32), (1, torch.float16)])  # fmt: skip
def test_head_dims_padded_to_block_d(head_dim, dtype):
    """head_dim 80 (the vision tower's) runs with BLOCK_D = 128 and masking; head_dim < 16 is
    zero-padded to BLOCK_D = 16 (tl.dot needs K >= 16), both with the default tiles."""
    assert la.block_d(head_dim) == max(16, 1 << (head_dim - 1).bit_length())
    q, k, v = qkv(2, 4, 2, 37, 37, head_dim, dtype, seed=3)
    check_against_reference(q, k, v, random_masked_rows(2, 37, "stage2", seed=3))


def test_head_dim_out_of_range_is_rejected():
    q, k, v = qkv(1, 1, 1, 4, 4, 257, torch.float32)
    with pytest.raises(ValueError, match=r"head_dim in \[1, 256\], got 257"):
        latent_attention(q, k, v)


# --- transformers integration on a tiny Qwen2.5-VL --------------------------------------------

IMG, VS, VE = 290, 292, 293  # image pad, vision start / end ids of the tiny config
# fp32 throughout; on a GPU, SDPA's fused kernels and ours sum in different orders.
MODEL_TOL = dict(atol=1e-5, rtol=1e-4) if DEVICE == "cpu" else dict(atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def tiny_models():
    """(sdpa model, the same weights with monet_latent) — a tiny Qwen2.5-VL built inline."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from monet_fast.model.attention import use_latent_attention

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=None,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMG, video_token_id=291, vision_start_token_id=VS, vision_end_token_id=VE,
    )  # fmt: skip
    ref = Qwen2_5_VLForConditionalGeneration(config).to(DEVICE).eval()
    lat = use_latent_attention(copy.deepcopy(ref))
    return ref, lat


def tiny_batch(L: int = 26):
    """Two samples with one 4-token image at 3..6 (its "slots" at 10..12); sample 0 right
    padded, sample 1 left padded."""
    B = 2
    ids = torch.randint(0, 280, (B, L), generator=torch.Generator().manual_seed(0))
    ids[:, 2], ids[:, 3:7], ids[:, 7] = VS, IMG, VE
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 5 :] = 0
    mask[1, :2] = 0
    mr = torch.zeros(B, L, 4, dtype=torch.int32)
    for j in range(3, 7):
        mr[:, j] = torch.tensor([j, 10, 13, L])
    inputs = dict(
        input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int(),
        pixel_values=torch.randn(B * 16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1)),
        image_grid_thw=torch.tensor([[1, 4, 4]] * B),
    )  # fmt: skip
    return {k: v.to(DEVICE) for k, v in inputs.items()}, mr.to(DEVICE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the latent kernel from the transformers attention function."""
    attention = importlib.import_module("monet_fast.model.attention")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return latent_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "latent_attention", spy)
    return calls


def test_use_latent_attention_switches_only_the_language_model(tiny_models):
    _, lat = tiny_models
    assert lat.config.text_config._attn_implementation == "monet_latent"
    assert lat.model.language_model.config._attn_implementation == "monet_latent"
    assert lat.config.vision_config._attn_implementation == "sdpa"


def test_hf_without_masked_rows_equals_sdpa(tiny_models, kernel_calls):
    ref, lat = tiny_models
    inputs, _ = tiny_batch()
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        expect, got = ref(**inputs).logits, lat(**inputs).logits
    torch.testing.assert_close(got[valid], expect[valid], **MODEL_TOL)
    assert len(kernel_calls) == 2  # both layers ran the kernel (padding folded into intervals)


def test_hf_masked_rows_equal_sdpa_with_dense_float_mask(tiny_models, kernel_calls):
    """masked_rows as a forward kwarg reaches the attention (through the vision tower too);
    logits and parameter gradients equal sdpa given the dense 4-D float mask."""
    ref, lat = tiny_models
    inputs, mr = tiny_batch()
    valid = inputs["attention_mask"].bool()
    L = valid.shape[1]
    allowed = dense_mask(mr, L, L) & valid[:, None, None, :]
    float_mask = torch.zeros(allowed.shape, device=DEVICE).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )
    position_ids, _ = ref.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    expect = ref(**{**inputs, "attention_mask": float_mask, "position_ids": position_ids}).logits
    got = lat(**inputs, masked_rows=mr).logits
    assert len(kernel_calls) == 2
    torch.testing.assert_close(got[valid], expect[valid], **MODEL_TOL)
    assert (got[valid] - lat(**inputs).logits[valid]).abs().max() > 1e-3  # the mask mattered

    weight = (
        torch.randn(got.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        * valid[..., None]
    )
    ref.zero_grad(), lat.zero_grad()
    (expect * weight).sum().backward()
    (got * weight).sum().backward()
    for (name, p_ref), p_lat in zip(ref.named_parameters(), lat.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_lat.grad, p_ref.grad, **MODEL_TOL, msg=name)
    ref.zero_grad(), lat.zero_grad()


@pytest.mark.parametrize("with_mask", [True, False])
def test_hf_cached_chunks_use_q_offset(tiny_models, with_mask, kernel_calls):
    """Prefill in two chunks over a DynamicCache (with the whole-sequence masked_rows, or plain
    causal): the attention derives q_offset = Sk - Sq; logits equal the one-pass forward."""
    from transformers import DynamicCache

    from monet_fast._compat import cache_kwarg

    _, lat = tiny_models
    cache_kw = cache_kwarg(lat)  # `cache` or, in transformers 5.17, `past_key_values`
    inputs, mr = tiny_batch()
    extra = {"masked_rows": mr} if with_mask else {}
    ids, cut = inputs["input_ids"], 11  # the cut falls inside the latent slots
    L = ids.shape[1]
    ones = torch.ones_like(inputs["attention_mask"])  # no padding here
    position_ids, _ = lat.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])  # fmt: skip
    with torch.no_grad():
        full = lat(**{**inputs, "attention_mask": ones}, position_ids=position_ids, **extra).logits
        cache = DynamicCache(config=lat.config)
        head = {k: inputs[k][:, :cut] for k in ("input_ids", "mm_token_type_ids")}
        first = lat(**{**inputs, **head, "attention_mask": ones[:, :cut]}, position_ids=position_ids[..., :cut], **{cache_kw: cache}, use_cache=True, **extra).logits  # fmt: skip
        second = lat(input_ids=ids[:, cut:], attention_mask=ones, position_ids=position_ids[..., cut:], **{cache_kw: cache}, use_cache=True, **extra).logits  # fmt: skip
    torch.testing.assert_close(torch.cat([first, second], 1), full, **MODEL_TOL)
    # Without a mask, full-length passes go to SDPA; the chunk after the cache (Sq < Sk) runs
    # the kernel with q_offset = Sk - Sq.
    assert [shape[2] for shape in kernel_calls] == ([L, L, cut, cut, L - cut, L - cut] if with_mask else [L - cut, L - cut])  # fmt: skip
