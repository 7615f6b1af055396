"""VLPO replay of `monet_vllm` rollouts: the latent layout of the released Monet-7B's vLLM runner.

One latent block in a response (REFERENCE.md §5.1 / §6, oracle 13; `monet_fast.decode.engine`):

    x | S (row := z_0) | PAD (row := z_1) ... PAD (row := z_{n-1}) | end

n <= K rows are overwritten, starting with S's own row; z_i is the post-norm hidden state of the
row before it (z_0 is the state that also predicted S). The engine records one latent per emitted
row of the block, so a block always holds n = 1 + (number of PAD ids) latents. It ends with

  forced_end   `</abs_vis_token>` after n = K rows (the sampled id was replaced by END);
  sampled_end  `</abs_vis_token>` sampled before K rows (early close, n < K);
  eos          an EOS sampled at a latent row (the runner stops on it, n < K);
  cut          the end of the response (max_new_tokens inside the block): every emitted row
               already has its latent, so the block is replayed and scored like any other.

Steps of the replay (indices into the response; the row layout is `seq.LatentBlock` with
`slots = (s, s + n)`, START's row included, which `latent_forward` accepts for this layout):

  token step   every id the engine kept as sampled: text, S, a sampled END, EOS; the logits at
               t - 1 predict ids[t]
  latent step  row s + i, action z_i; the mean is hidden[s + i - 1] (pairing "correct": the state
               that produced z_i) or hidden[s + i] (pairing "reference", the reference's actor)
  not a step   the PAD placeholders (their sampled ids were replaced; the only decision taken
               there, "not END", is not scored, as in the reference) and a forced END.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monet_fast.model import sequence as seq
from monet_fast.model.tokens import TokenIds

END_KINDS: tuple[str, ...] = ("forced_end", "sampled_end", "eos", "cut")


@dataclass(frozen=True)
class VllmBlock:
    """One monet_vllm latent block of a response: S at `start`, `n` latent rows, how it ended."""

    start: int  # index of `<abs_vis_token>` in the response
    n: int  # overwritten rows = latents (START's row + n - 1 placeholders)
    end: str  # one of END_KINDS


def parse_blocks(
    response: list[int], counts: list[int], token_ids: TokenIds, latent_size: int
) -> list[VllmBlock]:
    """The latent blocks of a monet_vllm response, given the engine's latents per block.

    `counts` are `GenerateOutput.latent_counts` of the response. Blocks open at the first
    len(counts) START ids (a START sampled after `max_latent_blocks` is ordinary text and comes
    after every block). Anything else is an error that names the block and the offending id.
    """
    starts = [i for i, t in enumerate(response) if t == token_ids.latent_start]
    if len(starts) < len(counts):
        raise ValueError(
            f"monet_vllm rollout: the latent trace has {len(counts)} blocks but the response "
            f"has only {len(starts)} <abs_vis_token> ids"
        )
    blocks, prev_end = [], 0
    for j, (s, n) in enumerate(zip(starts, counts)):
        where = f"monet_vllm rollout: latent block {j} (response index {s})"
        if s < prev_end:
            raise ValueError(f"{where} starts inside the previous block")
        if not 1 <= n <= latent_size:
            raise ValueError(f"{where} has {n} latents; allowed 1..latent_size={latent_size}")
        rows = response[s + 1 : s + n]
        if len(rows) < n - 1 or any(t != token_ids.latent_pad for t in rows):
            raise ValueError(
                f"{where} has {n} latents but its rows after START are {rows} "
                f"(expected {n - 1} <abs_vis_token_pad> ids)"
            )
        e = s + n
        if e == len(response):
            end = "cut"
        elif response[e] == token_ids.latent_end:
            end = "forced_end" if n == latent_size else "sampled_end"
        elif e == len(response) - 1 and n < latent_size and response[e] != token_ids.latent_pad:
            end = "eos"  # the runner stops on an EOS sampled at a latent row
        else:
            raise ValueError(
                f"{where} has {n} latents and is followed by id {response[e]} at index {e}; "
                "expected </abs_vis_token>, an EOS ending the response, or the response end"
            )
        blocks.append(VllmBlock(start=s, n=n, end=end))
        prev_end = e + (end in ("forced_end", "sampled_end"))
    return blocks


def rollout_latents(
    out, i: int, response: list[int], token_ids: TokenIds, latent_size: int
) -> tuple[list[VllmBlock], torch.Tensor]:
    """Blocks of row i of a `generate` output and all its latents [n_latents, H], block order.

    Every latent is kept, a block cut by max_new_tokens included (its emitted rows all have one).
    """
    blocks = parse_blocks(response, out.latent_counts[i], token_ids, latent_size)
    trace = out.latents[i]  # [n_blocks, K, H], zero-padded per block
    if not blocks:
        return blocks, trace.new_zeros(0, trace.shape[-1])
    return blocks, torch.cat([trace[j, : b.n] for j, b in enumerate(blocks)])


def step_indices(blocks: list[VllmBlock], n_response: int) -> tuple[list[int], list[int]]:
    """(token-step indices, latent-step rows) into a response of n_response ids, in order."""
    not_token, latent_rows = set(), []
    for blk in blocks:
        latent_rows += range(blk.start, blk.start + blk.n)
        not_token.update(range(blk.start + 1, blk.start + blk.n))  # placeholders
        if blk.end == "forced_end":
            not_token.add(blk.start + blk.n)
    return [i for i in range(n_response) if i not in not_token], latent_rows


def step_counts(blocks: list[VllmBlock], n_response: int) -> tuple[int, int]:
    """(token steps, latent steps) of a monet_vllm response (what the replay will score)."""
    tok, lat = step_indices(blocks, n_response)
    return len(tok), len(lat)


def replay_row(
    blocks: list[VllmBlock], p0: int, n_response: int, shift: int
) -> tuple[list[seq.LatentBlock], list[int], list[int]]:
    """For a response starting at row position p0: the `seq.LatentBlock`s `latent_forward` replays
    (slots = the overwritten rows, START's included), the token-step target positions, and the
    positions whose hidden state is each latent step's mean (row - shift)."""
    layout_blocks = [
        seq.LatentBlock(
            start=p0 + b.start,
            slots=(p0 + b.start, p0 + b.start + b.n),
            end=p0 + b.start + b.n if b.end in ("forced_end", "sampled_end") else None,
        )
        for b in blocks
    ]
    tok, lat = step_indices(blocks, n_response)
    return layout_blocks, [p0 + i for i in tok], [p0 + r - shift for r in lat]


__all__ = [
    "END_KINDS",
    "VllmBlock",
    "parse_blocks",
    "replay_row",
    "rollout_latents",
    "step_counts",
    "step_indices",
]
