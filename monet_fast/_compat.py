"""The one place for calls that differ between supported transformers / Triton versions.

Supported: transformers >=5.17,<6 (5.17.0 on the GPU image, 5.24.0 in development) and the Triton
that pairs with the installed torch (3.6.0 on the GPU image, 3.8.0 in development). Each shim
detects the feature, not the version number, so an untested version in between takes the branch
its API actually has. `make compat-check` runs the tests against the older versions.

Differences handled here (measured on the versions named):

* KV-cache argument name. transformers 5.24 renamed `past_key_values` to `cache` on every model,
  decoder layer and attention forward (the old name still works there with a deprecation warning,
  to be removed in 5.40). 5.17 only knows `past_key_values`: passing `cache=` there lands in
  `**kwargs` and is silently ignored, so a segment-by-segment forward runs without its past and
  fails later with a mask/shape mismatch. `cache_kwarg(module)` returns the name `module.forward`
  takes.
* Gradient checkpointing. transformers 5.2x renamed `gradient_checkpointing_enable(
  gradient_checkpointing_kwargs=...)` to `activation_checkpointing_enable(
  activation_checkpointing_kwargs=...)` (the old name warns); 5.17 has only the old one.
  `enable_activation_checkpointing(model, **kwargs)` calls whichever the model has.
"""

from __future__ import annotations

import functools
import inspect

# Names of the KV-cache argument, newest first.
_CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def _cache_kwarg_of(forward) -> str:
    params = inspect.signature(forward).parameters
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(
        f"{getattr(forward, '__qualname__', forward)} takes none of {list(_CACHE_KWARGS)}; "
        "monet_fast supports transformers >=5.17,<6"
    )


def cache_kwarg(module) -> str:
    """Name of the KV-cache argument of `module.forward`: `cache` (transformers >= 5.2x) or
    `past_key_values` (5.17). Works for the text model, a decoder layer or an attention module.
    """
    # Cached per class: signature inspection costs ~20 us, and this sits in per-segment loops.
    return _cache_kwarg_of(type(module).forward)


def enable_activation_checkpointing(model, **kwargs) -> None:
    """Turn on (non-reentrant etc. per `kwargs`) activation checkpointing under either name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
