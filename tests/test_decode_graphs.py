"""CUDA-graph decoding: the graph-safe logits-processor contract and its detector, the graph
cache following the weights, graph decoding == eager decoding.

On CPU the graph path is emulated (`LatentDecoder(emulate_graphs=True)`: bucketed static buffers,
full-cache attention, device-side counters, a "capture" run under the host-sync detector, stale
replays refused). The `gpu` tests capture real graphs; they compare runs whose arithmetic
differs (graph vs eager kernels, CPU vs GPU, bf16) token by token with a margin-aware criterion
(`decode_helpers.assert_tokens_match`) and with TF32 off.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from archs import ARCHS
from decode_helpers import (
    LAYOUTS,
    MarginRecorder,
    assert_tokens_match,
    decode_model,
    force_at,
    ids_of,
    latent_inputs,
    sequences,
)

from monet_fast.decode import GraphUnsafeProcessorWarning, LatentDecoder, generate
from monet_fast.decode import engine as engine_module
from monet_fast.decode.graph_safety import (
    GraphUnsafeError,
    check_logits_processor,
    detect_host_sync,
)
from monet_fast.decode.graphs import EagerStep
from monet_fast.decode.sampling import sample_tokens

# Margin-aware token comparison (see decode_helpers.assert_tokens_match). fp32 without TF32:
# graph vs eager logits differ by <= 1e-4 (measured, CPU emulation; logits |max| ~ 8), so 1e-2
# leaves 100x. bf16: they differ by up to 0.34 (measured, same set-up: the logits themselves are
# bf16, a step of 0.03 at 4-8, and exact ties occur); half of all steps have a margin above 0.5,
# so a real defect, which moves logits by O(1), still parts the runs where it is caught.
FP32_MARGIN = 1e-2
BF16_MARGIN = 0.5
UNSAFE = "error::monet_fast.decode.graph_safety.GraphUnsafeProcessorWarning"


def force_at_bool_mask(schedule: dict[int, int]):
    """The forcing processor as tests/test_decode.py first wrote it: boolean-mask indexing
    (a nonzero inside, i.e. a host sync), which raised inside CUDA-graph capture."""

    def processor(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        for i, tok in schedule.items():
            logits[index == i, tok] += 1e6
        return logits

    return processor


# ---------------------------------------------------------------------- detector (CPU)


def _branching(logits, index):
    if index[0] == 4:  # Python branching on a tensor value
        logits[:, 0] += 1.0
    return logits


UNSAFE_PROCESSORS = {
    "boolean-mask": force_at_bool_mask({1: 3}),
    "Tensor.__bool__": _branching,
    "Tensor.item": lambda logits, index: logits * index.max().item(),
    "Tensor.tolist": lambda logits, index: logits + index.tolist()[0],
    "aten.nonzero": lambda logits, index: logits.index_fill(1, (index == 1).nonzero()[:, 0], 0),
    "aten.masked_select": lambda logits, index: logits - logits.masked_select(logits > 0).sum(),
    "torch.tensor": lambda logits, index: logits.index_fill(1, torch.tensor([1, 2]), 0.0),
}


@pytest.mark.parametrize("reason", list(UNSAFE_PROCESSORS))
def test_detector_flags_host_syncs(reason):
    problem = check_logits_processor(UNSAFE_PROCESSORS[reason], 4, 10, torch.device("cpu"))
    assert problem is not None and reason.split(".")[-1] in problem, problem


def test_detector_accepts_graph_safe_code():
    ban = torch.tensor([1, 2])  # made once, outside the processor
    safe = [
        force_at({1: 3, 9: 3}),
        lambda logits, index: torch.where((index == 1)[:, None], logits, -logits),
        lambda logits, index: logits.masked_fill((index == 1)[:, None], float("-inf")),
        lambda logits, index: logits.index_fill(-1, ban, float("-inf")),
        lambda logits, index: logits.scatter(1, index.clamp(min=0)[:, None], 5.0),
        lambda logits, index: logits - logits.topk(2, dim=-1).values[:, 1:],
    ]
    # The package's own processors that run under graphs (VLPO rollouts, eval, benchmark).
    from monet_fast.bench.latent_decode import force_latent_every
    from monet_fast.eval.runner import _no_start
    from monet_fast.train.rollout import BanTokens

    safe += [BanTokens([1, 2]), _no_start(3), force_latent_every(3, 5)]
    for processor in safe:
        assert check_logits_processor(processor, 4, 10, torch.device("cpu")) is None
    # Sampling runs inside the captured graph (GPU readiness; the rest of the engine's step is
    # checked by the emulated capture of the tests below). latent_step_torch validates its ids
    # on the host on CPU only, so it cannot be checked here.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    temperature, top_p = torch.tensor(0.7), torch.tensor(0.9)
    with detect_host_sync("cpu"):
        sample_tokens(logits, True, temperature, top_p, gen)
    with pytest.raises(GraphUnsafeError, match="Tensor.item"):
        EagerStep(lambda: torch.ones(2).sum().item())  # an emulated capture refuses a sync too


def test_processor_with_wrong_output_is_refused():
    decoder = LatentDecoder(*decode_model("sft"), emulate_graphs=True)
    item = latent_inputs(decoder.processor)[:1]
    with pytest.raises(TypeError, match=r"shape \(1, \d+\) on cpu, got \(1, 3\)"):
        decoder.generate(item, max_new_tokens=2, logits_processor=lambda logits, i: logits[:, :3])


# -------------------------------------------------------------- graph path emulated (CPU)


@pytest.mark.filterwarnings(UNSAFE)
# Qwen3-VL (its decode step: q/k norms, interleaved mRoPE) with one layout: the layouts differ
# only in the C++ state machine, which the Qwen2.5-VL cases cover.
@pytest.mark.parametrize(
    "layout, arch", [(layout, ARCHS[0]) for layout in LAYOUTS] + [("sft", ARCHS[1])]
)
def test_graph_path_emulated_on_cpu_matches_eager(layout, arch):
    # The CUDA-graph path minus the capture: batch padded to a bucket, cache padded to 256
    # columns with a full-width mask, counters advanced on the device, buffers reused by the
    # next call (so their reset is tested too), the step "captured" under the host-sync
    # detector.
    model, processor = decode_model(layout, arch)
    ids = ids_of(processor)
    decoder = LatentDecoder(model, processor, emulate_graphs=True)
    proc = force_at({1: ids["S"], 9: ids["S"]})
    items = latent_inputs(processor)[:3]  # bucket 4: one padding row
    kw = dict(max_new_tokens=14, logits_processor=proc, return_latents=True, check_every=4)
    eager = generate(model, processor, items, **kw)
    for _ in range(2):
        static = decoder.generate(items, **kw)
        assert sequences(static) == sequences(eager)
        assert static.latent_counts == eager.latent_counts
        for a, b in zip(static.latents, eager.latents):
            # The graph path attends over the whole padded cache (other summation order than
            # eager's view): 1.4e-5 measured, 1e-4 as for the no-cache oracle.
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(decoder._graphs) == 1  # one runner, reused
    assert isinstance(next(iter(decoder._graphs.values())).graph, EagerStep)
    sampled = dict(max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)
    assert sequences(decoder.generate(items, **sampled)) == sequences(
        decoder.generate(items, **sampled)
    )


def test_unsafe_processor_decodes_eagerly_with_a_warning(monkeypatch):
    model, processor = decode_model("sft")
    ids = ids_of(processor)
    items = latent_inputs(processor)[:3]
    schedule = {1: ids["S"], 6: ids["S"]}
    kw = dict(max_new_tokens=8, return_latents=True)
    want = generate(model, processor, items, logits_processor=force_at(schedule), **kw)
    decoder = LatentDecoder(model, processor, emulate_graphs=True)
    unsafe = force_at_bool_mask(schedule)
    with pytest.warns(GraphUnsafeProcessorWarning, match="boolean-mask indexing"):
        got = decoder.generate(items, logits_processor=unsafe, **kw)
    assert sequences(got) == sequences(want)
    assert not decoder._graphs  # nothing captured
    with pytest.warns(GraphUnsafeProcessorWarning, match=r"Tensor.__bool__"):
        decoder.generate(items, logits_processor=_branching, **kw)
    # Without the check (the engine as it was), the capture fails, as CUDA's did.
    monkeypatch.setattr(engine_module, "check_logits_processor", lambda *args: None)
    with pytest.raises(GraphUnsafeError, match="boolean-mask indexing"):
        decoder.generate(items, logits_processor=unsafe, **kw)


def test_graph_cache_follows_weight_changes():
    base, processor = decode_model("sft")
    model = copy.deepcopy(base)  # this test changes the weights
    ids = ids_of(processor)
    items = latent_inputs(processor)[:3]
    proc = force_at({1: ids["S"], 5: ids["S"]})
    kw = dict(max_new_tokens=8, logits_processor=proc, return_latents=True)
    decoder = LatentDecoder(model, processor, emulate_graphs=True)
    first = decoder.generate(items, **kw)
    runner = next(iter(decoder._graphs.values()))

    # In-place updates (an optimizer step) keep the storage: the graph stays valid.
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)
    assert sequences(decoder.generate(items, **kw)) == sequences(first)
    assert next(iter(decoder._graphs.values())) is runner

    # New storage, same dtype (a reload): a replay of the old graph would read freed memory.
    for p in model.parameters():
        p.data = p.data.clone()
    assert sequences(decoder.generate(items, **kw)) == sequences(first)
    assert list(decoder._graphs.values()) != [runner] and len(decoder._graphs) == 1

    # model.to(bf16) (the reported failure): same as a fresh decoder, and bf16 buffers.
    model.to(torch.bfloat16)
    got = decoder.generate(items, **kw)
    fresh = LatentDecoder(model, processor, emulate_graphs=True).generate(items, **kw)
    assert sequences(got) == sequences(fresh)
    for a, b in zip(got.latents, fresh.latents):
        assert torch.equal(a, b)
    assert next(iter(decoder._graphs.values())).bufs.next_embeds.dtype == torch.bfloat16
    # bf16 graph path vs bf16 eager: the margin-aware criterion of the GPU tests, on CPU.
    ref = MarginRecorder(proc)
    eager = generate(model, processor, items, **{**kw, "logits_processor": ref})
    assert_tokens_match(got, eager, ref, BF16_MARGIN)


# ---------------------------------------------------------------------------------- GPU


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions in full precision (TF32 keeps 10 mantissa bits: logits
    then differ from the CPU's by ~1e-2, enough to flip near-tied greedy tokens)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def _assert_latents_close(got, want, same: list[bool], atol: float) -> None:
    for row, ok in enumerate(same):
        if ok:  # identical tokens: the same latent steps, comparable vectors
            assert got.latent_counts[row] == want.latent_counts[row]
            torch.testing.assert_close(got.latents[row], want.latents[row], atol=atol, rtol=0)


def _graph_vs_eager(model, processor, margin: float, latent_atol: float):
    """Graph decoding (captured, then replayed) == eager decoding on the same CUDA model."""
    ids = ids_of(processor)
    proc = force_at({1: ids["S"], 9: ids["S"]})
    items = latent_inputs(processor)[:3]  # bucket 4: one padding row
    kw = dict(max_new_tokens=20, return_latents=True, check_every=5)
    decoder = LatentDecoder(model, processor)
    ref = MarginRecorder(proc)
    eager = decoder.generate(items, logits_processor=ref, use_cuda_graphs=False, **kw)
    assert not decoder._graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphUnsafeProcessorWarning)
        for _ in range(2):  # the second call replays the cached graph
            graphed = decoder.generate(items, logits_processor=proc, **kw)
            same = assert_tokens_match(graphed, eager, ref, margin)
            _assert_latents_close(graphed, eager, same, latent_atol)
    assert len(decoder._graphs) == 1
    assert isinstance(next(iter(decoder._graphs.values())).graph, torch.cuda.CUDAGraph)
    return decoder, items, eager, kw


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graphs_match_eager(layout, no_tf32):
    cpu_model, processor = decode_model(layout)
    model = copy.deepcopy(cpu_model).cuda()  # the same weights as the CPU model
    # fp32, no TF32: kernels differ in summation order only. Latents (|x| <= ~3) differ by
    # 1.4e-5 between graph and eager on CPU; CPU vs GPU kernels may add more: 1e-3, still far
    # below what a wrong latent or position gives (O(1)).
    decoder, items, eager, kw = _graph_vs_eager(model, processor, FP32_MARGIN, 1e-3)
    ids = ids_of(processor)
    ref = MarginRecorder(force_at({1: ids["S"], 9: ids["S"]}))
    cpu = generate(cpu_model, processor, items, logits_processor=ref, **kw)
    same = assert_tokens_match(eager, cpu, ref, FP32_MARGIN)
    _assert_latents_close(eager, cpu, same, 1e-3)
    # Sampling inside the graph (private generator) is reproducible with a seed.
    sampled = dict(max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)
    assert sequences(decoder.generate(items, **sampled)) == sequences(
        decoder.generate(items, **sampled)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graphs_match_eager_bf16(layout):
    cpu_model, processor = decode_model(layout)
    model = copy.deepcopy(cpu_model).to("cuda", torch.bfloat16)
    # bf16 latents (post-norm hidden states, |x| <= ~3) differ by up to 0.15 between graph and
    # eager attention kernels (measured on CPU emulation): 0.3.
    _graph_vs_eager(model, processor, BF16_MARGIN, 0.3)


@pytest.mark.gpu
def test_cuda_graph_cache_follows_dtype_change(no_tf32):
    base, processor = decode_model("sft")
    model = copy.deepcopy(base).cuda()
    ids = ids_of(processor)
    items = latent_inputs(processor)[:3]
    proc = force_at({1: ids["S"], 6: ids["S"]})
    kw = dict(max_new_tokens=12, return_latents=True)
    decoder = LatentDecoder(model, processor)
    decoder.generate(items, logits_processor=proc, **kw)  # captures on the fp32 weights
    model.to(torch.bfloat16)  # frees the fp32 weights the graph points at
    got = decoder.generate(items, logits_processor=proc, **kw)
    runners = list(decoder._graphs.values())
    assert len(runners) == 1 and runners[0].bufs.next_embeds.dtype == torch.bfloat16
    ref = MarginRecorder(proc)
    eager = decoder.generate(items, logits_processor=ref, use_cuda_graphs=False, **kw)
    assert_tokens_match(got, eager, ref, BF16_MARGIN)


@pytest.mark.gpu
def test_cuda_unsafe_processor_decodes_eagerly(no_tf32):
    base, processor = decode_model("sft")
    model = copy.deepcopy(base).cuda()
    ids = ids_of(processor)
    items = latent_inputs(processor)[:3]
    schedule = {1: ids["S"], 9: ids["S"]}
    decoder = LatentDecoder(model, processor)
    ref = MarginRecorder(force_at(schedule))
    want = decoder.generate(items, max_new_tokens=12, logits_processor=ref, use_cuda_graphs=False)
    with pytest.warns(GraphUnsafeProcessorWarning, match="boolean-mask indexing"):
        got = decoder.generate(
            items, max_new_tokens=12, logits_processor=force_at_bool_mask(schedule)
        )
    assert not decoder._graphs
    assert_tokens_match(got, want, ref, FP32_MARGIN)
