"""VLPO's update on the groups one RL step kept (the optimizer half of `VLPORecipe._train_step`).

Kept groups are shuffled into mini-batches (one optimizer step each) of micro-batches; the frozen
scores are computed first (the reference for the KL term; the pre-update policy when one rollout
batch feeds several optimizer steps); then each mini-batch is one DeepSpeed step whose loss is
normalised by its steps on all ranks (token-level mean, see grpo.py). Ranks run matching
collectives: a rank with fewer micro-batches than another runs zero-loss ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from monet_fast.model.tokens import TokenIds
from monet_fast.train import grpo
from monet_fast.train.engine_setup import _all_reduce_sum
from monet_fast.train.rollout import (
    BanTokens,
    ReplayBatch,
    Rollout,
    build_replay_batch,
    step_counts,
)
from monet_fast.train.vlpo_config import RLConfig
from monet_fast.train.vlpo_metrics import latent_sums, term_stats, update_records
from monet_fast.train.vlpo_module import StepScores, score_steps


def micro_batches(
    groups: list[list[Rollout]],
    step: int,
    *,
    cfg: RLConfig,
    rank: int,
    device: torch.device,
) -> list[list[list[Rollout]]]:
    """Kept groups -> mini-batches (one optimizer step each) -> micro-batches of sequences.

    Groups are shuffled with a per-step seed and split into `n_updates` near-equal
    mini-batches, n_updates = ceil(kept groups on all ranks / mini_batch_prompts), the same
    on every rank; a rank with fewer micro-batches than another runs empty ones.
    """
    tr = cfg.trainer
    (n_global,) = _all_reduce_sum([len(groups)], device)
    n_updates = max(1, math.ceil(n_global / tr.mini_batch_prompts))
    rng = np.random.default_rng(cfg.seed * 31 + step * 17 + rank)
    order = rng.permutation(len(groups)).tolist()
    minis = []
    for part in np.array_split(np.asarray(order, dtype=np.int64), n_updates):
        seqs = [ro for g in part.tolist() for ro in groups[g]]
        mbs = tr.micro_batch_size
        minis.append([seqs[i : i + mbs] for i in range(0, len(seqs), mbs)])
    return minis


def pad_counts(minis: list[list], world: int, device: torch.device) -> list[int]:
    """Micro-batch count per mini-batch, the maximum over ranks (collectives must match)."""
    counts = [len(m) for m in minis]
    if world == 1:
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def update_on_groups(
    kept: list[list[Rollout]],
    step: int,
    *,
    cfg: RLConfig,
    engine: Any,
    module: torch.nn.Module,
    model: torch.nn.Module,
    processor: Any,
    reference: Callable[[], AbstractContextManager] | None,
    latent_size: int,
    ban: BanTokens,
    token_ids: TokenIds,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    """Frozen scores, then one optimizer step per mini-batch of `kept`; the step's statistics.

    engine: the DeepSpeed engine over `module` (the VLPOTrainModule); model: the policy inside it.

    reference: a context manager factory yielding the reference model for the scoring pass
    (None without a reference, i.e. ref.mode none).
    """
    o = cfg.vlpo
    reduce = lambda v: _all_reduce_sum(v, device)  # noqa: E731
    # Replay batches are built when used and dropped after (pixel values are per row);
    # processed prompts are shared through `encoded`.
    minis = micro_batches(kept, step, cfg=cfg, rank=rank, device=device)
    counts = pad_counts(minis, world, device)
    encoded: dict = {}

    def replay(mb: list[Rollout]) -> ReplayBatch:
        return build_replay_batch(
            mb, processor, latent_size, pairing=o.latent_pairing, encoded=encoded
        )

    def scores(scorer: torch.nn.Module) -> list[list[StepScores | None]]:
        return [
            [
                score_steps(
                    scorer,
                    replay(mb),
                    temperature=cfg.rollout.temperature,
                    sigma=o.sigma,
                    ban=ban,
                    ce_chunk_size=o.ce_chunk_size,
                )
                for mb in mini
            ]
            for mini in minis
        ]

    t1 = time.perf_counter()
    ref_scores: list[list[StepScores | None]] = [[None] * len(m) for m in minis]
    if reference is not None:
        with reference() as ref:
            ref_scores = scores(ref)
    old_scores: list[list[StepScores | None]] = [[None] * len(m) for m in minis]
    if len(minis) > 1:  # the pre-update policy, for the ratio of later mini-batches
        model.eval()
        old_scores = scores(model)
        model.train()
    t_score = time.perf_counter() - t1

    # Updates: one optimizer step per mini-batch, loss normalised by its steps on all ranks.
    t2 = time.perf_counter()
    lr = float(engine.get_lr()[0])
    all_terms: list[grpo.StepTerms] = []
    grad_norms = []
    # Per update: N_steps (all ranks); this rank's objective and latent sums (metrics).
    upd_steps: list[float] = []
    upd_local: list[list[float]] = []
    for u, mini in enumerate(minis):
        upd_terms: list[grpo.StepTerms] = []
        upd_loss = 0.0
        local = 0
        for mb in mini:
            for r in mb:
                n_tok, n_lat = step_counts(r, token_ids)
                local += n_tok + (n_lat if o.latent_term else 0)
        (n_steps,) = _all_reduce_sum([local], device)
        scale = world / max(n_steps, 1.0)
        for i in range(counts[u]):
            if i < len(mini):
                out = engine(replay(mini[i]), old_scores[u][i], ref_scores[u][i], scale=scale)
                upd_terms += out["terms"]
                objective = out["objective"]
            else:
                # Matching collectives: a zero loss that touches every trainable parameter.
                objective = sum(p.sum() * 0.0 for p in module.parameters() if p.requires_grad)
            engine.backward(objective, scale_wrt_gas=False)
            upd_loss += float(objective.detach()) / world
        engine.step()
        gn = engine.get_global_grad_norm()
        if gn is not None:
            grad_norms.append(float(gn))
        all_terms += upd_terms
        upd_steps.append(n_steps)
        upd_local.append([upd_loss, *latent_sums(upd_terms)])
    updates = update_records(upd_local, upd_steps, reduce)
    return dict(
        skipped=0,
        loss=sum(u["loss"] for u in updates) / len(updates),
        **term_stats(all_terms, reduce),
        updates=len(minis),
        update_metrics=updates,  # written as "update" lines by train(), then dropped
        lr=lr,
        grad_norm=grad_norms[-1] if grad_norms else None,
        score_s=t_score,
        update_s=time.perf_counter() - t2,
    )
