"""Static decode buffers: the KV cache and every per-step tensor of one batch bucket.

Everything a decode step reads or writes lives here at a fixed address, so the step can be
captured once in a CUDA graph and replayed (`graphs.py`); on CPU the same buffers are used
eagerly. A step never allocates host-visible state: step counters are 0-d device tensors that
the step itself increments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monet_fast._ops import MODE_DONE


class StaticKVCache:
    """Pre-allocated keys/values of every layer, [batch, kv_heads, max_len, head_dim] each.

    Duck-types the part of transformers' `Cache` that Qwen2.5-VL's attention uses
    (`update(key, value, layer_idx, ...)`), which is the same in transformers 5.17 and 5.24, so
    the engine does not depend on the StaticCache internals that changed between them.

    Three write modes, chosen by the engine before each forward:
      * prefill (`prefill=True`): the prompt's keys go to columns [0, L) of the first rows; the
        attention then runs over the prompt only, so the fresh keys are returned as they are.
      * decode, graph mode (`view_len=None`): one column at `write_pos` (a 0-d device tensor the
        step advances), full buffers returned; the attention mask hides unwritten columns.
      * decode, eager (`view_len=n`): same write, but only the first n columns are returned, so
        the attention does not scan the empty tail of the cache.
    """

    is_compileable = True

    def __init__(
        self,
        n_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.write_pos = torch.zeros((), dtype=torch.long, device=device)
        self.prefill = False
        self.view_len: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill:
            rows, length = key_states.shape[0], key_states.shape[2]
            keys[:rows, :, :length].copy_(key_states)
            values[:rows, :, :length].copy_(value_states)
            return key_states, value_states
        # index_copy_ with a device index: no host value is needed, so this is graph-safe.
        index = self.write_pos.view(1)
        keys.index_copy_(2, index, key_states)
        values.index_copy_(2, index, value_states)
        if self.view_len is not None:
            return keys[:, :, : self.view_len], values[:, :, : self.view_len]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by transformers when position ids are missing; we always pass them.
        return int(self.write_pos)


@dataclass
class DecodeBuffers:
    """Every tensor a decode step touches, for a batch bucket of `batch` rows.

    Shapes (B = batch bucket, H = hidden size, S = cache columns, T = emission slots,
    N = latent ring slots):
      mask        [B, 1, 1, S] additive float mask (0 keep, finfo.min masked), model dtype
      next_embeds [B, H] input embeddings of the next decode step
      base_pos    [B] int64 position of emission 0 (the first decoded token) per row
      step        0-d int64 emissions produced so far minus one (the index of the last one)
      offset      [B] int64 emissions that are not output (1 for a forced START from the prompt)
      mode, count, n_blocks, remaining  [B] int32 latent decode state (see _ops.latent_step)
      emit_ids    [B] int64, use_hidden [B] bool: the last step's emission
      out_ids     [B, T] int64, out_fed [B, T] bool: every emission, by emission index
      ring        [N, B, H] or None: the hidden states of the last N emissions (latent trace)
      temperature, top_p  0-d float32 sampling parameters
    """

    batch: int
    cache: StaticKVCache
    mask: torch.Tensor
    next_embeds: torch.Tensor
    base_pos: torch.Tensor
    step: torch.Tensor
    offset: torch.Tensor
    mode: torch.Tensor
    count: torch.Tensor
    n_blocks: torch.Tensor
    remaining: torch.Tensor
    emit_ids: torch.Tensor
    use_hidden: torch.Tensor
    out_ids: torch.Tensor
    out_fed: torch.Tensor
    ring: torch.Tensor | None
    temperature: torch.Tensor
    top_p: torch.Tensor
    eos_ids: torch.Tensor

    @classmethod
    def allocate(
        cls,
        model,
        batch: int,
        max_len: int,
        eos_ids: list[int],
        ring_size: int | None,
    ) -> DecodeBuffers:
        """Buffers for `batch` rows and `max_len` cache columns (= emission slots)."""
        text_cfg = model.config.get_text_config()
        device = model.device
        dtype = model.get_input_embeddings().weight.dtype
        hidden = text_cfg.hidden_size
        head_dim = getattr(text_cfg, "head_dim", None) or hidden // text_cfg.num_attention_heads
        cache = StaticKVCache(
            n_layers=text_cfg.num_hidden_layers,
            batch=batch,
            kv_heads=text_cfg.num_key_value_heads,
            head_dim=head_dim,
            max_len=max_len,
            dtype=dtype,
            device=device,
        )

        def ints(fill: int = 0) -> torch.Tensor:
            return torch.full((batch,), fill, dtype=torch.int32, device=device)

        return cls(
            batch=batch,
            cache=cache,
            mask=torch.full(
                (batch, 1, 1, max_len), torch.finfo(dtype).min, dtype=dtype, device=device
            ),
            next_embeds=torch.zeros(batch, hidden, dtype=dtype, device=device),
            base_pos=torch.zeros(batch, dtype=torch.long, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            offset=torch.zeros(batch, dtype=torch.long, device=device),
            mode=ints(MODE_DONE),
            count=ints(),
            n_blocks=ints(),
            remaining=ints(),
            emit_ids=torch.zeros(batch, dtype=torch.long, device=device),
            use_hidden=torch.zeros(batch, dtype=torch.bool, device=device),
            out_ids=torch.zeros(batch, max_len, dtype=torch.long, device=device),
            out_fed=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            ring=(
                torch.zeros(ring_size, batch, hidden, dtype=dtype, device=device)
                if ring_size
                else None
            ),
            temperature=torch.ones((), dtype=torch.float32, device=device),
            top_p=torch.ones((), dtype=torch.float32, device=device),
            eos_ids=torch.tensor(eos_ids, dtype=torch.long, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.cache.max_len
