"""VLPO rollouts: generate -> token/latent trace -> a replay batch -> per-step log-probs.

Rollouts run through `monet_fast.decode.generate` in the training process, on the policy's own
parameters (no second serving stack, no sockets): the weights an optimizer step writes are the
weights the next rollout reads. Text tokens are sampled (temperature, top-p); latent steps are
deterministic, the fed-back hidden state being the Gaussian mean (reference: "sampled = mu").
Every latent vector of every rollout is kept, in the model dtype it was fed back in (the
reference round-trips them through fp16).

Replay (sft layout): a response `t1 .. S PAD x K E .. EOS` is scored by the batched latent
forward with the rollout's latents inserted in the K slots. Its steps:

  token step   every sampled token (text, S, EOS): logits at position t-1 predict ids[t]
  latent step  slot k at position p_k, action z_k (the vector fed into it). The mean that
               produced z_k is the hidden state at p_k - 1 (the output at S for k = 1, at slot
               k-1 after), so mu_k = hidden[p_k - 1] of the replay ("correct" pairing; with
               unchanged weights mu_k == z_k and logp == 0). `pairing="reference"` uses
               hidden[p_k], as the reference's actor does (REFERENCE.md §5.2, an off-by-one).
  not a step   PAD ids (latent slots are latent steps instead) and the forced E

A response cut by max_new_tokens inside a latent block keeps its sampled S as a token step; the
incomplete block's slots are not scored (nothing follows them, so no later step depends on them).

Replay (monet_vllm layout, `latent_layout="monet_vllm"`): START's own row is the first latent row,
blocks hold 1..K latents (early END, EOS, or cut by max_new_tokens); see `replay_vllm`.

`<|image_pad|>` / `<|video_pad|>` are never sampled (`ban_ids` in rollouts and, for consistency,
in the log-prob): the replay would read a sampled image-pad id as an image placeholder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from monet_fast.data.batching import assistant_pattern
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.data.types import Sample
from monet_fast.model import sequence as seq
from monet_fast.model.arch import get_arch
from monet_fast.model.chunked_ce import head_cross_entropy
from monet_fast.model.feedback import FeedbackNorm
from monet_fast.model.latent import latent_forward
from monet_fast.model.tokens import IMAGE_PAD, VIDEO_PAD, TokenIds
from monet_fast.model.unwrap import unwrap
from monet_fast.stage import Stage
from monet_fast.train import replay_vllm
from monet_fast.train.replay_vllm import VllmBlock
from monet_fast.train.rewards import RewardResult, RolloutInfo

PAIRINGS: tuple[str, ...] = ("correct", "reference")


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled response and everything the update needs from it."""

    sample: Sample
    group: int  # prompt group id (unique within an RL step on this rank)
    prompt: str
    response_ids: torch.Tensor  # [n] int64, as generated (EOS included)
    text: str
    latents: torch.Tensor  # [n_steps, H] vectors fed into the slots of complete blocks, in order
    n_blocks: int  # complete latent blocks
    truncated_block: bool  # the response ends inside a latent block
    finish_reason: str
    reward: RewardResult | None = None
    advantage: float = 0.0
    latent_layout: str = "sft"  # the decoding layout that produced it (sft | monet_vllm)
    # monet_vllm: every latent block (complete or not), latents in `latents` in the same order.
    vllm_blocks: list[VllmBlock] = field(default_factory=list)

    @property
    def info(self) -> RolloutInfo:
        return RolloutInfo(
            n_tokens=int(self.response_ids.numel()),
            n_latent_blocks=self.n_blocks,
            finish_reason=self.finish_reason,
        )


class BanTokens:
    """Graph-safe logits processor that makes some ids unsampleable (-inf).

    One instance per recipe: the decoder keys its captured CUDA graphs by processor identity.
    """

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = sorted(set(int(i) for i in ids))
        self._index: dict[tuple, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        # Cached per mode: a tensor made under inference_mode (rollouts) cannot enter autograd
        # (the update), and a captured CUDA graph must find it already on the device.
        key = (device, torch.is_inference_mode_enabled())
        if key not in self._index:
            self._index[key] = torch.tensor(self.ids, dtype=torch.long, device=device)
        return self._index[key]

    def __call__(self, logits: torch.Tensor, _position: torch.Tensor | None = None) -> torch.Tensor:
        if not self.ids:
            return logits
        return logits.index_fill(-1, self.index(logits.device), float("-inf"))


def default_ban_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in (IMAGE_PAD, VIDEO_PAD) if t in vocab]


def prompt_input(sample: Sample) -> dict:
    """A templated prompt for `generate` (system + user turn + assistant header)."""
    return {"text": seq.render_prompt(sample), "images": list(sample.question_images)}


def _blocks_of(ids: list[int], tid: TokenIds) -> list[tuple[int, int, bool]]:
    """(start, n_pads, closed) per latent block of a response (S, PAD run, E?)."""
    out = []
    for s in (i for i, t in enumerate(ids) if t == tid.latent_start):
        j = s + 1
        while j < len(ids) and ids[j] == tid.latent_pad:
            j += 1
        out.append((s, j - s - 1, j < len(ids) and ids[j] == tid.latent_end))
    return out


def generate_rollouts(
    model,
    processor,
    samples: Sequence[Sample],
    *,
    group_size: int,
    max_new_tokens: int,
    latent_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    group_offset: int = 0,
    ban: BanTokens | None = None,
    use_cuda_graphs: bool = True,
    max_latent_blocks: int | None = None,
    latent_layout: str = "sft",
) -> list[Rollout]:
    """`group_size` sampled responses per sample (grouped, in sample order).

    latent_layout: "sft" (the SFT layout) or "monet_vllm" (the released Monet-7B's vLLM runner).

    The sequences go to `generate` in chunks of `batch_size`; chunk c samples with seed
    `seed + c`, so a rollout depends only on (weights, samples, seed, batch_size).
    """
    from monet_fast.decode import generate

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    jobs = [(g, s) for g, s in enumerate(samples) for _ in range(group_size)]
    rollouts: list[Rollout] = []
    was_training = model.training
    model.eval()
    try:
        for c in range(math.ceil(len(jobs) / batch_size)):
            chunk = jobs[c * batch_size : (c + 1) * batch_size]
            out = generate(
                model,
                processor,
                [prompt_input(s) for _, s in chunk],
                max_new_tokens=max_new_tokens,
                latent_size=latent_size,
                latent_layout=latent_layout,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                seed=seed + c,
                return_latents=True,
                max_latent_blocks=max_latent_blocks,
                use_cuda_graphs=use_cuda_graphs,
                logits_processor=ban,
            )
            for i, (g, sample) in enumerate(chunk):
                ids = out.sequences[i].tolist()
                if latent_layout == "monet_vllm":
                    rollouts.append(
                        _vllm_rollout(out, i, ids, sample, group_offset + g, tid, latent_size)
                    )
                    continue
                blocks = _blocks_of(ids, tid)
                if blocks and blocks[-1][1] == 0 and not blocks[-1][2]:
                    # Cut right after S: no latent was fed yet, so the trace has no entry.
                    blocks = blocks[:-1]
                    cut_at_start = True
                else:
                    cut_at_start = False
                counts = out.latent_counts[i]
                if len(counts) != len(blocks):
                    raise RuntimeError(
                        f"rollout has {len(blocks)} latent blocks in its ids but {len(counts)} "
                        "in its latent trace"
                    )
                keep = []
                for b, ((_, n_pads, closed), n) in enumerate(zip(blocks, counts)):
                    if closed:
                        if n_pads != latent_size or n != latent_size:
                            raise RuntimeError(
                                f"a closed latent block has {n_pads} slots and {n} latents, "
                                f"expected latent_size={latent_size}"
                            )
                        keep.append(out.latents[i][b])
                    elif b != len(blocks) - 1:
                        raise RuntimeError("an unclosed latent block before the end of a response")
                hidden = out.latents[i].shape[-1]
                lat = (
                    torch.cat(keep) if keep else torch.zeros(0, hidden, dtype=out.latents[i].dtype)
                )
                rollouts.append(
                    Rollout(
                        sample=sample,
                        group=group_offset + g,
                        prompt=seq.render_prompt(sample),
                        response_ids=out.sequences[i],
                        text=out.texts[i],
                        latents=lat,
                        n_blocks=len(keep),
                        truncated_block=cut_at_start or (bool(blocks) and not blocks[-1][2]),
                        finish_reason=out.finish_reasons[i],
                    )
                )
    finally:
        model.train(was_training)
    return rollouts


def _vllm_rollout(out, i: int, ids: list[int], sample, group: int, tid, latent_size: int):
    blocks, latents = replay_vllm.rollout_latents(out, i, ids, tid, latent_size)
    return Rollout(
        sample=sample,
        group=group,
        prompt=seq.render_prompt(sample),
        response_ids=out.sequences[i],
        text=out.texts[i],
        latents=latents,
        n_blocks=sum(b.end in ("forced_end", "sampled_end") for b in blocks),
        truncated_block=bool(blocks) and blocks[-1].end == "cut",
        finish_reason=out.finish_reasons[i],
        latent_layout="monet_vllm",
        vllm_blocks=blocks,
    )


def step_counts(rollout: Rollout, token_ids: TokenIds) -> tuple[int, int]:
    """(token steps, latent steps) of a rollout, as `build_replay_batch` will lay them out.

    Lets a trainer normalise by the steps of a whole optimizer step before building any batch.
    """
    if rollout.latent_layout == "monet_vllm":
        return replay_vllm.step_counts(rollout.vllm_blocks, int(rollout.response_ids.numel()))
    ids = rollout.response_ids.tolist()
    n_lat = int(rollout.latents.shape[0])
    tail = 0
    if rollout.truncated_block:
        start = max(i for i, t in enumerate(ids) if t == token_ids.latent_start)
        tail = len(ids) - start - 1  # the incomplete block's slots
    # Each closed block: K slots (latent steps) + the forced END (no step).
    return len(ids) - n_lat - rollout.n_blocks - tail, n_lat


@dataclass
class ReplayBatch:
    """A micro-batch of rollouts laid out for `latent_forward`, plus where its steps are.

    Token steps: logits at (tok_row, tok_col) predict tok_target. Latent steps: the mean is the
    hidden state at (lat_row, lat_col), the action lat_z. *_seq: index of the rollout in `rollouts`.
    """

    batch: LatentBatch
    latents: list[torch.Tensor]
    tok_row: torch.Tensor
    tok_col: torch.Tensor
    tok_target: torch.Tensor
    tok_seq: torch.Tensor
    lat_row: torch.Tensor
    lat_col: torch.Tensor
    lat_z: torch.Tensor
    lat_seq: torch.Tensor
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def n_token_steps(self) -> int:
        return int(self.tok_row.numel())

    @property
    def n_latent_steps(self) -> int:
        return int(self.lat_row.numel())

    @property
    def n_steps(self) -> int:
        return self.n_token_steps + self.n_latent_steps

    def advantages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step advantages (token steps, latent steps): each step gets its response's."""
        adv = torch.tensor([r.advantage for r in self.rollouts], dtype=torch.float32)
        return adv[self.tok_seq], adv[self.lat_seq]


def build_replay_batch(
    rollouts: Sequence[Rollout],
    processor,
    latent_size: int,
    *,
    pairing: str = "correct",
    encoded: dict | None = None,
) -> ReplayBatch:
    """Lay rollouts out as one right-padded batch (prompt ids + response ids) with their steps.

    encoded: a cache of processed prompts keyed by sample identity, shared by the micro-batches
    of one RL step (a group's image is processed once).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"latent_pairing must be one of {list(PAIRINGS)}, got {pairing!r}")
    if not rollouts:
        raise ValueError("build_replay_batch needs at least one rollout")
    layouts_used = sorted({r.latent_layout for r in rollouts})
    if len(layouts_used) != 1:
        raise ValueError(f"a replay batch needs one latent layout, got rollouts in {layouts_used}")
    latent_layout = layouts_used[0]
    tokenizer = processor.tokenizer
    tid = TokenIds.from_tokenizer(tokenizer)
    pattern = assistant_pattern(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tid.endoftext

    # Prompts are processed once per distinct prompt (a group shares one).
    encoded = {} if encoded is None else encoded
    rows, grids, pixels = [], [], []
    for r in rollouts:
        key = id(r.sample)
        if key not in encoded:
            inp = prompt_input(r.sample)
            encoded[key] = processor(
                text=[inp["text"]], images=inp["images"] or None, return_tensors="pt"
            )
        enc = encoded[key]
        prompt_ids = enc["input_ids"][0]
        rows.append((prompt_ids, enc["mm_token_type_ids"][0], r.response_ids.long()))
        if enc.get("pixel_values") is not None:
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    length = max(len(p) + len(resp) for p, _, resp in rows)
    bsz = len(rows)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(bsz, length, dtype=torch.long)
    mm_types = torch.zeros(bsz, length, dtype=torch.long)
    for b, (p, types, resp) in enumerate(rows):
        n = len(p) + len(resp)
        input_ids[b, :n] = torch.cat([p, resp])
        attention_mask[b, :n] = 1
        mm_types[b, : len(p)] = types
    grid = torch.cat(grids) if grids else None
    merge = getattr(processor.image_processor, "merge_size", 2)

    layouts, latents = [], []
    tok = {"row": [], "col": [], "target": [], "seq": []}
    lat = {"row": [], "col": [], "z": [], "seq": []}
    for b, (r, (p, _, resp)) in enumerate(zip(rollouts, rows)):
        ids = input_ids[b].tolist()
        lay = seq.layout_from_ids(ids, tid, pattern, attention_mask[b].tolist())
        p0 = len(p)
        shift = 1 if pairing == "correct" else 0
        if any(blk.start < p0 for blk in lay.latent_blocks):
            raise ValueError("a latent block in the prompt: VLPO prompts must not hold one")
        if latent_layout == "monet_vllm":
            lay.latent_blocks, tok_pos, mean_cols = replay_vllm.replay_row(
                r.vllm_blocks, p0, len(resp), shift
            )
        else:
            # Only closed blocks are latent steps; an unclosed last block is ordinary tokens.
            lay.latent_blocks = [blk for blk in lay.latent_blocks if blk.end is not None]
            for blk in lay.latent_blocks:
                if blk.slots[1] - blk.slots[0] != latent_size:
                    raise ValueError(
                        f"a latent block has {blk.slots[1] - blk.slots[0]} slots, expected "
                        f"latent_size={latent_size}"
                    )
            slots = lay.slot_positions
            not_token = set(slots) | {blk.end for blk in lay.latent_blocks}
            if r.truncated_block:
                # The incomplete block's slots (PAD ids after its S) are not token steps either.
                start = max(i for i, t in enumerate(ids[: p0 + len(resp)]) if t == tid.latent_start)
                not_token |= set(range(start + 1, p0 + len(resp)))
            tok_pos = [t for t in range(p0, p0 + len(resp)) if t not in not_token]
            mean_cols = [pos - shift for pos in slots]
        if len(mean_cols) != r.latents.shape[0]:
            raise ValueError(
                f"rollout has {r.latents.shape[0]} latents for {len(mean_cols)} latent slots"
            )
        layouts.append(lay)
        latents.append(r.latents)
        for t in tok_pos:
            tok["row"].append(b)
            tok["col"].append(t - 1)
            tok["target"].append(ids[t])
            tok["seq"].append(b)
        lat["row"] += [b] * len(mean_cols)
        lat["col"] += mean_cols
        lat["seq"] += [b] * len(mean_cols)
        lat["z"].append(r.latents)

    batch = LatentBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=grid,
        mm_token_type_ids=mm_types,
        position_ids=get_arch(getattr(processor, "model_type", None)).rope_index(
            input_ids, mm_types, grid, attention_mask, merge
        ),
        # No CE: VLPO reads hidden states, not the stage loss.
        labels=torch.full_like(input_ids, seq.IGNORE_INDEX),
        observation_mask=torch.zeros_like(input_ids, dtype=torch.bool),
        latent_slot_mask=torch.zeros_like(input_ids, dtype=torch.bool),
        masked_rows=None,
        layouts=layouts,
        stage=Stage.INFER,
        latent_size=latent_size,
        latent_layout=latent_layout,
        keys=[r.sample.key for r in rollouts],
    )
    for b, lay in enumerate(layouts):
        batch.latent_slot_mask[b, lay.slot_positions] = True
    hidden = next((r.latents.shape[-1] for r in rollouts if r.latents.numel()), 0)

    def long(x):
        return torch.tensor(x, dtype=torch.long)

    return ReplayBatch(
        batch=batch,
        latents=latents,
        tok_row=long(tok["row"]),
        tok_col=long(tok["col"]),
        tok_target=long(tok["target"]),
        tok_seq=long(tok["seq"]),
        lat_row=long(lat["row"]),
        lat_col=long(lat["col"]),
        lat_z=torch.cat(lat["z"]) if lat["z"] else torch.zeros(0, hidden),
        lat_seq=long(lat["seq"]),
        rollouts=list(rollouts),
    )


@dataclass
class StepLogProbs:
    """Per-step quantities of one forward over a ReplayBatch."""

    token_logp: torch.Tensor  # [n_token_steps] fp32 (differentiable when computed with grad)
    mu: torch.Tensor  # [n_latent_steps, H] policy means (model dtype, differentiable)


def step_logprobs(
    model,
    replay: ReplayBatch,
    *,
    temperature: float,
    ban: BanTokens | None = None,
    ce_chunk_size: int = 0,
) -> StepLogProbs:
    """Token log-probs log_softmax(logits / T) and latent means of a replay, in one latent forward.

    ce_chunk_size > 0: the log-prob of the sampled token is -CE of the chunked linear + CE
    (`monet_fast.model.chunked_ce`), without [n_tokens, V] logits; 0: plain log-softmax.

    The latent log-probs are left to the caller (`grpo.latent_terms`, fused kernel) so their
    backward is fused with the clipped surrogate.
    """
    device = model.device
    out = latent_forward(model, replay.batch, latents=replay.latents, return_hidden=True)
    # The rollout latent z was fed back after latent.feedback_norm: the mean is too.
    feedback = FeedbackNorm.for_model(unwrap(model))
    hidden = out.hidden  # [B, L, H] post-norm
    tok_h = hidden[replay.tok_row.to(device), replay.tok_col.to(device)]
    if ce_chunk_size and tok_h.shape[0]:
        ban_ids = ban.index(device) if ban is not None and ban.ids else None
        token_logp = -head_cross_entropy(
            model.lm_head,
            tok_h,
            replay.tok_target.to(device),
            chunk_size=ce_chunk_size,
            temperature=temperature,
            ban_ids=ban_ids,
        )
        mu = feedback(hidden[replay.lat_row.to(device), replay.lat_col.to(device)])
        return StepLogProbs(token_logp=token_logp, mu=mu)
    # fp32 log-softmax over the vocabulary (as verl's logprobs_from_logits); rollout temperature
    # applied to the logits, as the reference's actor does.
    logits = model.lm_head(tok_h).float() / temperature
    if ban is not None:
        logits = ban(logits)
    token_logp = (
        torch.log_softmax(logits, dim=-1)
        .gather(-1, replay.tok_target.to(device).view(-1, 1))
        .squeeze(-1)
    )
    mu = feedback(hidden[replay.lat_row.to(device), replay.lat_col.to(device)])
    return StepLogProbs(token_logp=token_logp, mu=mu)


__all__ = [
    "PAIRINGS",
    "BanTokens",
    "ReplayBatch",
    "Rollout",
    "StepLogProbs",
    "build_replay_batch",
    "default_ban_ids",
    "generate_rollouts",
    "prompt_input",
    "step_counts",
    "step_logprobs",
]
