"""CUDA-graph capture of the decode step.

The engine's decode step (`LatentDecoder._decode_step` in graph mode) reads and writes only
static buffers (`state.DecodeBuffers`): the model forward on the static KV cache, the LM head,
sampling, the C++/CUDA `latent_step` (state machine + next-input select) and the output
bookkeeping, with step counters kept as device tensors that the step advances itself. Such a
step can be recorded once into a `torch.cuda.CUDAGraph` and replayed: one graph launch per decode
step instead of hundreds of kernel launches from Python, and no host synchronisation at all
inside a latent block (the host looks at the state every `check_every` replays).

One graph is captured per (batch bucket, cache length, configuration, logits processor) by the
engine and cached (`LatentDecoder._runner`); a change of the weights' storage, dtype or device
(`weights_fingerprint`) drops every cached graph. A logits processor is captured with the step:
it must follow the graph-safe contract of `graph_safety.py`, which the engine checks first.
Known cost: inside a graph the attention spans the whole static cache (prompt + max_new_tokens,
rounded up to 256 columns; unwritten columns are masked), where eager decoding attends over the
columns in use only. Plain and latent decoding share the same graph, so this does not affect
their ratio. Sampling with a private `torch.Generator` needs
`CUDAGraph.register_generator_state` (torch >= 2.5); without it the default CUDA generator is
used (the graph then follows `torch.cuda.manual_seed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from monet_fast.decode.graph_safety import detect_host_sync


def graphs_available() -> bool:
    """True when CUDA graphs can be captured here."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph")


def make_graph_generator(device: torch.device) -> torch.Generator | None:
    """A private CUDA generator if this torch can register it with a graph, else None."""
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return None
    return torch.Generator(device=device)


def capture_decode_step(
    step: Callable[[], None],
    generators: Sequence[torch.Generator] = (),
    warmup_steps: int = 2,
    pool=None,
) -> torch.cuda.CUDAGraph:
    """Record `step()` into a CUDA graph and return it (call `.replay()` to run one step).

    `generators`: the private generators `step` draws from, registered with the graph (each
    replay advances their offsets); needs `CUDAGraph.register_generator_state`.

    `step` must only touch static buffers and must not synchronise with the host. It is run
    `warmup_steps` times on a side stream first (as torch requires: lazy initialisation, cuBLAS
    workspaces and the caching allocator must settle before capture); those warm-up steps change
    the buffers, so the caller resets them before the first real replay (the engine's prefill
    does).
    """
    if not graphs_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        step()
    torch.cuda.synchronize()
    return graph


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """(address, dtype, device, shape) of every parameter and buffer of `model`.

    A captured graph reads the weights at the addresses it saw at capture; any change of this
    fingerprint (model.to(dtype / device), a reload, `p.data = ...`) makes it stale. In-place
    updates (optimizer steps) keep it. No tensor data is read.
    """
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)


class EagerStep:
    """Stand-in for a captured graph that runs the step eagerly (`emulate_graphs` testing).

    It emulates what capture demands of a step, so CPU tests see what a GPU capture would: the
    "capture" runs the step once under `detect_host_sync` (CUDA capture raises on a host sync;
    its warm-up steps change the buffers, as this run does), and a replay after the weights
    moved raises instead of reading freed memory as a stale CUDA graph would.
    """

    def __init__(
        self,
        step: Callable[[], None],
        device: torch.device | str = "cpu",
        fingerprint: Callable[[], tuple] | None = None,
    ) -> None:
        self.step = step
        self.fingerprint = fingerprint
        self.captured_on = fingerprint() if fingerprint is not None else None
        with detect_host_sync(device):
            step()

    def replay(self) -> None:
        if self.fingerprint is not None and self.fingerprint() != self.captured_on:
            raise RuntimeError(
                "replayed a (emulated) CUDA graph captured on other weights: the model's "
                "parameters changed storage, dtype or device since capture"
            )
        self.step()
