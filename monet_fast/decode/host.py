"""The host side of a generate() call: periodic checks, stop strings, streaming, the results.

The decode step keeps all state on the device (`state.DecodeBuffers`); every `check_every` steps
the engine hands it to `HostView.check`, which pulls the new emissions (and fed-back latents)
to the host, marks finished rows, applies stop strings and streams; `collect` builds the
`GenerateOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from monet_fast import _ops
from monet_fast.decode.config import DecodeConfig
from monet_fast.decode.state import DecodeBuffers

# (row, new token ids) called at every host check with the tokens produced since the last one.
Streamer = Callable[[int, list[int]], None]


@dataclass
class GenerateOutput:
    """What `generate` returns, one entry per input, in input order.

    sequences: generated ids [n] int64 (EOS included when it stopped on one); a fed-back latent
        step appears as the `<abs_vis_token_pad>` id.
    texts: the sequences decoded with special tokens (latent blocks visible), final EOS removed.
    latents: with return_latents, [n_blocks, K, hidden] per input: every vector fed back, block by
        block; a block closed early (monet_vllm END) or cut by a stop is zero-padded, see
        latent_counts.
    latent_counts: with return_latents, the number of vectors in each block.
    finish_reasons: "eos", "stop" (stop string) or "length" (max_new_tokens).
    """

    sequences: list[torch.Tensor]
    texts: list[str]
    latents: list[torch.Tensor] | None = None
    latent_counts: list[list[int]] | None = None
    finish_reasons: list[str] = field(default_factory=list)


class HostView:
    """The host side of a generate() call: periodic checks, stop strings, streaming, results."""

    def __init__(
        self,
        tokenizer,
        hidden_size: int,
        bufs: DecodeBuffers,
        cfg: DecodeConfig,
        n_rows: int,
        offsets: list[int],
        streamer: Streamer | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.bufs = bufs
        self.cfg = cfg
        self.n_rows = n_rows
        self.offsets = offsets
        self.streamer = streamer
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]  # emissions, by index
        self.fed: list[list[bool]] = [[] for _ in range(n_rows)]
        self.vectors: list[dict[int, torch.Tensor]] = [{} for _ in range(n_rows)]
        self.n_emitted = [0] * n_rows
        self.stop_len: list[int | None] = [None] * n_rows  # output length cut by a stop string
        self.clean_len = [0] * n_rows  # output length known to contain no stop string
        self.reported = [0] * n_rows
        self.done = [False] * n_rows

    def _output_len(self, row: int) -> int:
        if self.stop_len[row] is not None:
            return self.stop_len[row]
        return self.n_emitted[row] - self.offsets[row]

    def check(self, last: int) -> bool:
        """Pull emissions up to index `last` to the host; returns True when every row is done."""
        bufs, n = self.bufs, self.n_rows
        first = len(self.ids[0])
        new_ids = bufs.out_ids[:n, first : last + 1].cpu().tolist()
        new_fed = bufs.out_fed[:n, first : last + 1].cpu()
        mode = bufs.mode[:n].cpu().tolist()
        remaining = bufs.remaining[:n].cpu().tolist()
        if bufs.ring is not None and bool(new_fed.any()):
            ring_len = bufs.ring.shape[0]
            rows, cols = new_fed.nonzero(as_tuple=True)
            slots = torch.remainder(cols + first, ring_len).to(bufs.ring.device)
            vecs = bufs.ring[slots, rows.to(bufs.ring.device)].cpu()
            for r, c, v in zip(rows.tolist(), cols.tolist(), vecs):
                self.vectors[r][first + c] = v
        for b in range(n):
            self.ids[b].extend(new_ids[b])
            self.fed[b].extend(new_fed[b].tolist())
            budget = self.cfg.max_new_tokens + self.offsets[b]
            self.n_emitted[b] = budget - remaining[b]
            self.done[b] = mode[b] == _ops.MODE_DONE
        if self.cfg.stop_strings:
            self._apply_stop_strings()
        if self.streamer is not None:
            for b in range(n):
                end = self._output_len(b)
                if end > self.reported[b]:
                    start = self.offsets[b]
                    self.streamer(b, self.ids[b][start + self.reported[b] : start + end])
                    self.reported[b] = end
        return all(self.done)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _apply_stop_strings(self) -> None:
        stops = self.cfg.stop_strings
        for b in range(self.n_rows):
            if self.stop_len[b] is not None:
                continue
            start, end = self.offsets[b], self.offsets[b] + self._output_len(b)
            out = self.ids[b][start:end]
            if not any(s in self._decode(out) for s in stops):
                self.clean_len[b] = len(out)
                continue
            # Shortest prefix that contains a stop string (HF semantics: keep the stop text).
            cut = next(
                i
                for i in range(self.clean_len[b] + 1, len(out) + 1)
                if any(s in self._decode(out[:i]) for s in stops)
            )
            self.stop_len[b] = cut
            self.done[b] = True
            if not bool(self.bufs.mode[b] == _ops.MODE_DONE):
                self.bufs.mode[b] = _ops.MODE_DONE

    def collect(self) -> GenerateOutput:
        cfg = self.cfg
        sequences, texts, reasons = [], [], []
        latents: list[torch.Tensor] | None = [] if cfg.return_latents else None
        counts: list[list[int]] | None = [] if cfg.return_latents else None
        hidden_size = self.hidden_size
        for b in range(self.n_rows):
            start = self.offsets[b]
            length = self._output_len(b)
            out = self.ids[b][start : start + length]
            if self.stop_len[b] is not None:
                reason = "stop"
            elif out and out[-1] in cfg.eos_ids:
                reason = "eos"
            else:
                reason = "length"
            sequences.append(torch.tensor(out, dtype=torch.long))
            texts.append(self._decode(out[:-1] if reason == "eos" else out))
            reasons.append(reason)
            if latents is not None:
                # Emission indices < start + length, including a forced START's fed-back row.
                fed = [i for i in sorted(self.vectors[b]) if i < start + length]
                blocks: list[list[torch.Tensor]] = []
                prev = None
                for i in fed:
                    if prev is None or i != prev + 1:
                        blocks.append([])
                    blocks[-1].append(self.vectors[b][i])
                    prev = i
                dtype = self.bufs.next_embeds.dtype
                t = torch.zeros(len(blocks), cfg.latent_size, hidden_size, dtype=dtype)
                for j, block in enumerate(blocks):
                    t[j, : len(block)] = torch.stack(block)
                latents.append(t)
                counts.append([len(block) for block in blocks])
        return GenerateOutput(
            sequences=sequences,
            texts=texts,
            latents=latents,
            latent_counts=counts,
            finish_reasons=reasons,
        )
