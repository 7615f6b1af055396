"""CUDA-graph capture of the decode step.

The engine's decode step (`LatentDecoder._decode_step` in graph mode) reads and writes only
static buffers (`state.DecodeBuffers`): the model forward on the static KV cache, the LM head,
sampling, the C++/CUDA `latent_step` (state machine + next-input select) and the output
bookkeeping, with step counters kept as device tensors that the step advances itself. Such a
step can be recorded once into a `torch.cuda.CUDAGraph` and replayed: one graph launch per decode
step instead of hundreds of kernel launches from Python, and no host synchronisation at all
inside a latent block (the host looks at the state every `check_every` replays).

One graph is captured per (batch bucket, cache length, configuration) by the engine and cached
(`LatentDecoder._runner`). Known cost: inside a graph the attention spans the whole static cache
(prompt + max_new_tokens, rounded up to 256 columns; unwritten columns are masked), where eager
decoding attends over the columns in use only. Plain and latent decoding share the same graph,
so this does not affect their ratio. Sampling with a private `torch.Generator` needs
`CUDAGraph.register_generator_state` (torch >= 2.5); without it the default CUDA generator is
used (the graph then follows `torch.cuda.manual_seed`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    generator: torch.Generator | None = None,
    warmup_steps: int = 2,
    pool=None,
) -> torch.cuda.CUDAGraph:
    """Record `step()` into a CUDA graph and return it (call `.replay()` to run one step).

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
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        step()
    torch.cuda.synchronize()
    return graph


class EagerStep:
    """Stand-in for a captured graph that runs the step eagerly (`emulate_graphs` testing)."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()
