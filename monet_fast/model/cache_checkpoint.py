"""Gradient checkpointing of decoder layers that keeps the KV cache (latent stages 2/3, VLPO replay).

transformers' `GradientCheckpointingLayer` sets `cache=None` inside checkpointed layers in
training, because a layer that writes the cache would append its keys/values a second time when
backward recomputes it. The segment-wise latent forward (`monet_fast.model.latent`) needs the
cache, so here each decoder layer is checkpointed by our own non-reentrant
`torch.utils.checkpoint.checkpoint`, which:

  * snapshots the layer's cache slot (a shallow copy of its attributes: the key/value tensors as
    they were before this segment, and the length counters) when the layer first runs;
  * on recompute (during backward) puts that snapshot back, so the layer sees exactly the past it
    saw in the forward and its `torch.cat` appends this segment once, giving the same saved
    tensors (checkpoint checks their metadata);
  * afterwards restores the slot to what it held before the recompute, so the cache keeps the
    original key/value objects that later segments' graphs already reference.

Non-reentrant checkpointing keeps the forward graph itself (only saved tensors are dropped), so
gradients still flow from a later segment's attention into an earlier segment's keys/values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


def checkpointing_requested(layers) -> bool:
    """True when transformers' gradient checkpointing was switched on for these decoder layers
    (`enable_activation_checkpointing`); the latent forward then checkpoints them cache-safely."""
    return any(getattr(layer, "gradient_checkpointing", False) for layer in layers)


def _checkpointed_forward(_layer, _idx: int, _cache, _cache_kw: str, *args, **kwargs):
    """One decoder layer call, checkpointed with the cache slot snapshot/restore above.
    (Underscored names: the layer's own keyword arguments include `cache`.)"""
    layer, layer_idx, cache, cache_kw = _layer, _idx, _cache, _cache_kw
    class_forward = partial(type(layer).forward, layer)

    def forward(*a, **kw):
        # The recompute runs in backward, after `cache_safe_checkpointing` has put transformers'
        # flag back: keep its wrapper from checkpointing again (and dropping the cache) here.
        flag = getattr(layer, "gradient_checkpointing", False)
        layer.gradient_checkpointing = False
        try:
            return class_forward(*a, **kw)
        finally:
            layer.gradient_checkpointing = flag

    if not (layer.training and torch.is_grad_enabled()) or kwargs.get(cache_kw) is not cache:
        # No backward will replay this call (eval, no_grad), or a call with another cache:
        # run as is.
        return forward(*args, **kwargs)
    if layer_idx >= len(cache.layers):
        raise RuntimeError(
            f"cache-safe checkpointing needs the cache's layer slots created up front "
            f"(DynamicCache(config=...)); layer {layer_idx} has no slot yet"
        )
    slot = cache.layers[layer_idx]
    before = dict(slot.__dict__)  # tensors by reference: nothing is copied
    calls = [0]

    def run(*a, **kw):
        calls[0] += 1
        if calls[0] == 1:
            return forward(*a, **kw)
        # Recompute: show the layer the past it saw in the forward, then put the cache back.
        current = dict(slot.__dict__)
        slot.__dict__.clear()
        slot.__dict__.update(before)
        try:
            return forward(*a, **kw)
        finally:
            # `finally`: non-reentrant checkpoint stops a recompute early by raising once it
            # has every tensor it needs.
            slot.__dict__.clear()
            slot.__dict__.update(current)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def cache_safe_checkpointing(layers, cache, cache_kw: str, enabled: bool) -> Iterator[None]:
    """Within the block, calls of `layers` (a decoder's layer list) that write `cache` are
    checkpointed cache-safely (`enabled`) or not at all (`enabled=False`); in both cases
    transformers' own checkpointing (which would drop the cache) is switched off for them and
    restored on exit.

    The recompute closures are created per call, so backward may run after the block exits.
    """
    flags = []
    for idx, layer in enumerate(layers):
        flags.append(getattr(layer, "gradient_checkpointing", False))
        layer.gradient_checkpointing = False
        if enabled:
            # An instance attribute shadows the class's forward for `layer(...)` calls.
            layer.forward = partial(_checkpointed_forward, layer, idx, cache, cache_kw)
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            if enabled:
                del layer.forward
            layer.gradient_checkpointing = flag
