"""The version shims of `monet_fast._compat`, on whichever transformers is installed.

Both branches of each shim are tested with stand-in classes (so a shim that hard-codes one
version's name fails on any version), and the cache shim once on the real tiny model: a chunked
forward that passes the cache under the wrong name runs without its past (transformers 5.17
drops an unknown `cache=` into **kwargs silently). `make compat-check` runs this file against
transformers 5.17 / Triton 3.6 as well.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from monet_fast._compat import cache_kwarg, enable_activation_checkpointing
from monet_fast.model import tiny_model


class _NewCacheName(torch.nn.Module):
    def forward(self, x, attention_mask=None, cache=None, use_cache=False, **kwargs):
        return x


class _OldCacheName(torch.nn.Module):
    def forward(self, x, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        return x


class _NoCache(torch.nn.Module):
    def forward(self, x, **kwargs):
        return x


def test_cache_kwarg_follows_the_signature():
    assert cache_kwarg(_NewCacheName()) == "cache"
    assert cache_kwarg(_OldCacheName()) == "past_key_values"
    with pytest.raises(TypeError, match=r"_NoCache.forward takes none of .*transformers >=5.17"):
        cache_kwarg(_NoCache())


def test_cache_kwarg_feeds_the_real_cache():
    """Two chunks over one DynamicCache under `cache_kwarg`'s name == one full forward."""
    model, _ = tiny_model()
    lm = model.model.language_model
    for module in (lm, lm.layers[0], lm.layers[0].self_attn):
        assert cache_kwarg(module) == cache_kwarg(lm), type(module).__name__
    torch.manual_seed(0)
    x = torch.randn(1, 7, lm.config.hidden_size)
    pos = torch.arange(7).view(1, 1, 7).expand(3, 1, 7)
    with torch.no_grad():
        full = lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        cache = DynamicCache(config=lm.config)
        for s, e in ((0, 4), (4, 7)):
            out = lm(
                inputs_embeds=x[:, s:e],
                position_ids=pos[..., s:e],
                use_cache=True,
                **{cache_kwarg(lm): cache},
            )
            assert cache.get_seq_length() == e
    torch.testing.assert_close(out.last_hidden_state, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_enable_activation_checkpointing_calls_the_method_the_model_has():
    calls = []

    class New:
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new", activation_checkpointing_kwargs))

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old-on-new", gradient_checkpointing_kwargs))  # deprecated alias

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    enable_activation_checkpointing(New(), use_reentrant=False)
    enable_activation_checkpointing(Old(), use_reentrant=False)
    assert calls == [("new", {"use_reentrant": False}), ("old", {"use_reentrant": False})]


def test_enable_activation_checkpointing_on_the_tiny_model():
    model, _ = tiny_model()
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    layer = model.model.language_model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
