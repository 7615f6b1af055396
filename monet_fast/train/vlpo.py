"""VLPO (Monet's latent GRPO) on DeepSpeed: rollouts through our engine, judge-free rewards.

    monet-fast rl --config configs/tiny/vlpo.yaml --init runs/tiny/stage3/hf --output runs/tiny/vlpo
    python -m monet_fast.train.vlpo --config configs/qwen2_5_vl_7b/vlpo.yaml --init ... --output ...
    torchrun --nproc_per_node 8 -m monet_fast.train.vlpo --config ... --init ... --output ...

Python: `rl(config="configs/tiny/vlpo.yaml", init="runs/tiny/stage3/hf", output="runs/rl")`.

One RL step (every rank, `VLPORecipe.train`):

    prompts   = this rank's share of the step's prompt batch (seeded order, as SFT's data order)
    rollouts  = generate(policy, G samples per prompt, T, top-p, K latents per block)   decode/
    rewards   = 0.9 correct + 0.1 format (rules; optional judge)                        rewards.py
    A         = group-normalised rewards (GRPO)                                          grpo.py
    keep      = groups whose accuracy lies in (acc_low, acc_high], pooled over up to
                filter.max_extra_rollouts more rollout calls (the epoch's next prompts) until
                prompts_per_step groups are kept; none kept -> skip the step     filtering.py
    ref/old   = per-step log-probs of the frozen reference (KL) [and of the policy when one
                rollout batch feeds several optimizer steps]                             rollout.py
    for each mini-batch of kept groups (one optimizer step each):               vlpo_update.py
        loss = Σ steps [clipped surrogate + kl_coef low_var_kl] / N_steps(mini-batch, all ranks)
        engine.backward per micro-batch; engine.step once (caller-owned accumulation boundary)
        log an "update" line: update_in_rollout, latent_loss, latent_ratio_mean, ...  vlpo_metrics.py

Step counter: `global_step` counts RL steps (rollout batches), skipped or not; a step consumes
its prompts either way, so data order and rollout seeds are functions of the step index and a
resumed run reproduces the uninterrupted one. `optimizer_steps` and `skipped_steps` are kept in
the resume record and logged.

Deviations from the reference (REFERENCE.md §5), on purpose:
  * the latent term is applied (the released actor silently falls back to token-only log-probs)
    and its mean is paired with the position that produced the latent (`vlpo.latent_pairing:
    reference` reproduces the reference's same-position pairing);
  * latents stay in the model dtype they were fed back in and the log-prob is fp32 (fused kernel);
  * the filter's pool is per RL step and bounded (filter.max_extra_rollouts); short of the quota
    the step trains on what it kept (the reference pools 256 prompts and skips the chunk unless
    64 survive); a step without a usable group is skipped; both are logged;
  * loss = token-level mean over the whole mini-batch (see grpo.py); the judge is optional.
Latent layout: `rollout.latent_layout` sft (our SFT stages) or monet_vllm (the released
Monet-7B's vLLM runner: START's own row is a latent, blocks of 1..K rows; `replay_vllm`); K comes
from model.latent_size.

On the latent term: rollout latents are the Gaussian mean itself (deterministic, as in the
reference), so at the rollout policy d log N(z; mu, sigma^2) / d mu = (z - mu) / sigma^2 = 0 with
the correct pairing: the first optimizer step on a rollout batch gets no gradient from latent
steps, and later mini-batches of the same batch (trainer.mini_batch_prompts < prompts_per_step;
every shipped config makes several) see a clipped, advantage-weighted pull of mu towards the
rollout latent (A > 0) or away from it (A < 0), plus the KL to the reference. The "update" lines
of metrics.jsonl show it (latent_ratio_mean != 1, latent_kl > 0 from update_in_rollout 1 on). With `latent_pairing: reference` the term is non-zero from
the start, but it then compares the state at p with the input at p, which no policy produced.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from monet_fast.model.tokens import TokenIds
from monet_fast.train import checkpoint as ckpt
from monet_fast.train.config_schema import ConfigError
from monet_fast.train.data import dataset_fingerprint, epoch_order
from monet_fast.train.engine_setup import (
    _all_reduce_sum,
    build_deepspeed_config,
    build_optimizer,
    lr_lambda,
)
from monet_fast.train.filtering import QUOTA_MET, pool_groups
from monet_fast.train.prompts import load_prompts, prepare_prompt
from monet_fast.train.recipe_base import RecipeBase
from monet_fast.train.rewards import MonetReward, build_judge, safe_reward
from monet_fast.train.rollout import BanTokens, Rollout, default_ban_ids, generate_rollouts
from monet_fast.train.vlpo_config import RLConfig
from monet_fast.train.vlpo_eval import evaluate_on_ranks
from monet_fast.train.vlpo_metrics import UPDATE_EVENT, rollout_stats
from monet_fast.train.vlpo_module import VLPOTrainModule
from monet_fast.train.vlpo_reference import gathered_parameters, zero3_reference
from monet_fast.train.vlpo_state import RLMetricsLogger, RLProgress, RLResult, load_rl_checkpoint
from monet_fast.train.vlpo_update import update_on_groups

logger = logging.getLogger("monet_fast.train")

# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class VLPORecipe(RecipeBase):
    """VLPO on DeepSpeed: the policy is a DeepSpeed engine (ZeRO-2 default, ZeRO-3 / offload by
    config), rollouts run through `monet_fast.decode` on the policy's parameters in the same
    processes, the reference model is frozen (a device copy, CPU-offloaded, or a ZeRO-3 shard).

    Features: group rollouts with deterministic latent steps and their latent trace; rule-based
    rewards with pluggable functions and an optional judge; GRPO advantages; clipped token and
    latent (Gaussian, fp32 fused kernel) surrogates with dual clip; low-variance KL; online
    difficulty filtering pooled over a bounded number of rollout calls, never crashing; several
    optimizer steps per rollout batch; variable micro-batch counts (caller-owned DeepSpeed
    accumulation boundary); JSONL metrics (per RL step and per update) + progress bar; atomic
    checkpoints, exact resume, HF export. A sibling of `SFTRecipe` over `recipe_base.RecipeBase`
    (distributed init, policy model, DeepSpeed engine, checkpoints, resume, export).

    Raises (ConfigError, at construction or set-up):
        - no model (neither --init nor model.tiny_seed); bf16 on CPU;
        - rollout / objective / filter / reward values out of range (see `vlpo_config._validate_rl`);
        - ref.mode none with kl_coef > 0; ref.offload_param without ref.mode zero3;
        - prompts_per_step not divisible by the number of ranks, or a dataset smaller than one
          RL step's prompts;
        - a DeepSpeed JSON that defines optimizer/scheduler or contradicts the config;
        - existing checkpoints in the output directory without --resume, or --resume with none.
    A reward that raises on a response is logged and counted (`reward_failures`) and its group is
    not trained on (`rewards.safe_reward`); RuntimeError only when it fails on every response
    of a step.
    """

    def __init__(self, cfg: RLConfig, *, resume: str | None = None) -> None:
        super().__init__(cfg, resume=resume)
        self.metrics: RLMetricsLogger | None = None
        self.ref_model = None
        self.ref_engine = None

    # ---- set-up -----------------------------------------------------------------------------

    def setup_common(self) -> None:
        """Distributed init, seeds, run directory, prompts, step counts."""
        cfg = self.cfg
        self.setup_runtime()
        self.refuse_existing_checkpoints()
        r = cfg.rollout
        if r.prompts_per_step % self.world:
            raise ConfigError(
                f"rollout.prompts_per_step ({r.prompts_per_step}) must be divisible by the number "
                f"of ranks ({self.world}): each rank rolls out whole groups"
            )
        self.local_prompts = r.prompts_per_step // self.world
        self.write_run_files()
        self.samples, self.data_report = load_prompts(cfg.data)
        self.write_data_report()
        self.steps_per_epoch = len(self.samples) // r.prompts_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(self.samples)} prompts, fewer than one RL step's "
                f"rollout.prompts_per_step = {r.prompts_per_step}"
            )
        tr = cfg.trainer
        self.stop_step = tr.max_steps or tr.epochs * self.steps_per_epoch
        self.updates_per_step = math.ceil(r.prompts_per_step / tr.mini_batch_prompts)
        self.total_steps = cfg.scheduler.total_steps or self.stop_step * self.updates_per_step

    def _resolve_init(self, path: str | None) -> str | None:
        """--init may name an HF directory or an SFT run directory holding hf/."""
        if path is None:
            return None
        p = Path(path)
        if not (p / "config.json").is_file() and (p / ckpt.EXPORT_DIR / "config.json").is_file():
            return str(p / ckpt.EXPORT_DIR)
        return path

    def _ds_view(self) -> Any:
        """What `build_deepspeed_config` reads, in RL terms (nominal accumulation count)."""
        cfg, tr = self.cfg, self.cfg.trainer
        seqs = tr.mini_batch_prompts * cfg.rollout.group_size
        accum = max(1, math.ceil(seqs / self.world / tr.micro_batch_size))
        view = argparse.Namespace(
            trainer=argparse.Namespace(micro_batch_size=tr.micro_batch_size, grad_accum=accum),
            optim=cfg.optim,
            deepspeed=cfg.deepspeed,
        )
        view.resolved_deepspeed_json = cfg.resolved_deepspeed_json
        return view

    def setup(self) -> None:
        """Data, policy engine, reference model, rewards; load a checkpoint when resuming."""

        self.setup_common()
        cfg = self.cfg
        t0 = time.perf_counter()
        init = self._resolve_init(cfg.model.init)
        # With model.gradient_checkpointing the replay's latent_forward checkpoints cache-safely.
        self.prepare_policy(init)
        self.latent_size = cfg.model.latent_size
        self.latent_layout = cfg.rollout.latent_layout
        if self.latent_layout != "sft":
            # The exported model decodes in the layout it was trained on (saved config field).
            from monet_fast.model.config import (
                LatentConfig,
                apply_latent_config,
                get_latent_config,
            )

            apply_latent_config(
                self.model,
                LatentConfig.from_tokenizer(
                    self.processor.tokenizer, self.latent_size, self.latent_layout
                ).replace(feedback_norm=get_latent_config(self.model).feedback_norm),
            )
        self.ban = BanTokens(default_ban_ids(self.processor.tokenizer))
        self.token_ids = TokenIds.from_tokenizer(self.processor.tokenizer)
        self.reward_fn = MonetReward(
            cfg.reward.correct_weight,
            cfg.reward.format_weight,
            cfg.reward.format_rule,
            extra=[(f.name, f.weight) for f in cfg.reward.functions],
            judge=build_judge(
                cfg.reward.judge.base_url,
                cfg.reward.judge.model,
                api_key_env=cfg.reward.judge.api_key_env,
                timeout=cfg.reward.judge.timeout,
                retries=cfg.reward.judge.retries,
            ),
        )

        module = VLPOTrainModule(self.model, cfg.vlpo, cfg.rollout.temperature, self.ban)
        fused = self.device.type == "cuda" and not cfg.deepspeed.offload_optimizer
        optimizer = build_optimizer(module, cfg.optim, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.scheduler, self.total_steps)
        )
        self.ds_config = build_deepspeed_config(self._ds_view(), self.world, self.bf16)
        # The number of micro-batches per optimizer step depends on how many groups the filter
        # keeps: the caller owns the accumulation boundary (backward accumulates, step updates).
        self.ds_config["managed_gradient_accumulation"] = False
        zero = self.ds_config["zero_optimization"]
        self.zero_stage = int(zero["stage"])
        if self.zero_stage < 2 and zero.get("overlap_comm"):
            zero["overlap_comm"] = False  # DeepSpeed: unmanaged accumulation needs it off here
        self.init_engine(module, optimizer, scheduler)
        self.setup_reference(init)

        self.progress = RLProgress(
            seed=cfg.seed,
            global_batch_size=cfg.rollout.prompts_per_step,
            dataset_fingerprint=dataset_fingerprint(self.samples),
            n_samples=len(self.samples),
            world_size=self.world,
        )
        self.progress = self.resume_progress(self.progress, load_rl_checkpoint)

        self.metrics = RLMetricsLogger(
            self.output,
            cfg.logging,
            rank=self.rank,
            total_steps=self.stop_step,
            initial_step=self.progress.global_step,
            run_config=cfg.to_dict(),
        )
        self.metrics.event(
            "resume" if self.resume is not None else "start",
            step=self.progress.global_step,
            kind="vlpo",
            world_size=self.world,
            prompts_per_step=cfg.rollout.prompts_per_step,
            group_size=cfg.rollout.group_size,
            n_prompts=len(self.samples),
            latent_size=self.latent_size,
            setup_s=time.perf_counter() - t0,
        )

    def setup_reference(self, init: str | None) -> None:
        """The frozen reference model for the KL term (None with ref.mode none)."""
        mode = self.cfg.ref.mode
        if mode == "none":
            return
        if self.peft_model is not None:
            # LoRA: the reference is the policy's base with its adapters disabled (no copy;
            # `_reference_on_device` disables them for the scoring pass).
            self.ref_model = self.model
            return
        path = self._resolve_init(self.cfg.ref.model) if self.cfg.ref.model else init
        ref, _ = self.load_model(path)
        ref.eval().requires_grad_(False)
        if mode == "copy":
            self.ref_model = ref
        elif mode == "offload":
            self.ref_model = ref.to("cpu")
        else:
            self.ref_engine = zero3_reference(
                ref, self.world, self.bf16, self.cfg.ref.offload_param
            )
            self.ref_model = self.ref_engine.module

    @contextmanager
    def _reference_on_device(self):
        """offload: hold the reference in CPU memory, move it in for the scoring pass only.
        LoRA: the policy itself, adapters disabled (and in eval mode) for the scoring pass."""
        if self.peft_model is not None:
            from monet_fast.model.lora import adapters_disabled

            with adapters_disabled(self.peft_model) as base:
                yield base
        elif self.cfg.ref.mode == "offload" and self.device.type != "cpu":
            self.ref_model.to(self.device)
            try:
                yield self.ref_model
            finally:
                self.ref_model.to("cpu")
        else:
            yield self.ref_model

    def _gathered(self):
        """Full parameters for decoding under ZeRO-3 (`vlpo_reference.gathered_parameters`)."""
        return gathered_parameters(self.engine, self.model, self.zero_stage)

    # ---- one RL step ------------------------------------------------------------------------

    def step_prompts(self, step_in_epoch: int, epoch: int) -> list:
        """This rank's prompts for an RL step: a slice of the seeded epoch order."""
        cfg = self.cfg
        order = epoch_order(len(self.samples), cfg.seed, epoch, cfg.trainer.shuffle)
        p = cfg.rollout.prompts_per_step
        chunk = order[step_in_epoch * p : (step_in_epoch + 1) * p]
        mine = chunk[self.rank * self.local_prompts : (self.rank + 1) * self.local_prompts]
        return [
            prepare_prompt(self.samples[i], cfg.data.image_budget, cfg.rollout.prompt_suffix)
            for i in mine
        ]

    @property
    def decode_graphs(self) -> bool:
        """CUDA-graph decoding for rollouts and eval: rollout.cuda_graphs, off under ZeRO-3
        (whose full parameters exist only while gathered)."""
        return self.cfg.rollout.cuda_graphs and self.zero_stage != 3

    def rollout_seed(self, step: int, call: int = 0) -> int:
        """Sampling seed of an RL step's rollout call on this rank (resume reproduces it)."""
        base = self.cfg.seed * 1_000_003 + step * 7919 + self.rank * 104_729
        return (base + call * 15_485_863) % 2**62

    def rollouts(self, prompts: list, step: int, call: int = 0) -> list[Rollout]:
        """Rollout call `call` of an RL step (extra calls come from the filter's pool): group
        ids continue across calls, seeds differ."""
        r = self.cfg.rollout
        # Captured decode graphs follow weight moves by themselves (the engine keys its graph
        # cache on the parameters' storage, dtype and device).
        with self._gathered():
            out = generate_rollouts(
                self.model,
                self.processor,
                prompts,
                group_size=r.group_size,
                max_new_tokens=r.max_new_tokens,
                latent_size=self.latent_size,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=self.rollout_seed(step, call),
                batch_size=r.batch_size,
                group_offset=call * self.local_prompts,
                ban=self.ban,
                use_cuda_graphs=self.decode_graphs,
                max_latent_blocks=r.max_latent_blocks,
                latent_layout=self.latent_layout,
            )
        for ro in out:
            # A failing reward is logged and marks the rollout; its group is not trained on.
            ro.reward = safe_reward(self.reward_fn, ro.text, ro.sample, ro.info)
        return out

    def _train_step(self, step: int, prompts: list) -> dict[str, Any]:
        """One RL step: rollouts pooled until the prompt quota is met (extra calls take the
        epoch's next prompt batches), then one optimizer step per mini-batch of kept groups."""
        cfg, o = self.cfg, self.cfg.vlpo
        t0 = time.perf_counter()
        at = self.progress  # the step's data position; extra calls read the next batches

        def roll(call: int) -> list[Rollout] | None:
            if call == 0:
                return self.rollouts(prompts, step)
            if at.step_in_epoch + call >= self.steps_per_epoch:
                return None
            more = self.step_prompts(at.step_in_epoch + call, at.epoch)
            return self.rollouts(more, step, call)

        # Rewards -> advantages (per group, on this rank) -> difficulty filter, pooled.
        f = cfg.filter
        reduce = lambda v: _all_reduce_sum(v, self.device)  # noqa: E731
        pool = pool_groups(roll, quota=self.local_prompts, f=f, adv_eps=o.adv_eps, reduce=reduce)
        kept = pool.kept
        stats: dict[str, Any] = {
            **rollout_stats(pool, reduce),
            "rollout_s": time.perf_counter() - t0,
        }
        n_kept = stats["groups_kept"]
        if stats["reward_failures"] and stats["reward_failures"] == stats["responses"]:
            # One bad sample is survivable (its group is dropped); every reward failing is a
            # broken reward function that would otherwise skip every step in silence.
            raise RuntimeError(
                f"RL step {step + 1}: the reward failed on all {stats['responses']} responses "
                "(each logged with its sample id); fix the reward function"
            )
        if pool.reason != QUOTA_MET:
            logger.info("RL step %d: filter pool %s", step + 1, pool.reason)
        if n_kept < f.min_groups:
            why = "no usable group" if n_kept == 0 else f"{int(n_kept)} < filter.min_groups"
            stats.update(skipped=1, skip_reason=why, step_s=time.perf_counter() - t0)
            return stats

        # Frozen scores, then one optimizer step per mini-batch of kept groups (vlpo_update.py).
        stats.update(
            update_on_groups(
                kept,
                step,
                cfg=cfg,
                engine=self.engine,
                module=self.module,
                model=self.model,
                processor=self.processor,
                reference=self._reference_on_device if self.ref_model is not None else None,
                latent_size=self.latent_size,
                ban=self.ban,
                token_ids=self.token_ids,
                rank=self.rank,
                world=self.world,
                device=self.device,
            ),
            step_s=time.perf_counter() - t0,
        )
        return stats

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> RLResult:
        """Run RL steps until `stop_step`; checkpoint periodically and at the end; export."""
        cfg, tr, p = self.cfg, self.cfg.trainer, self.progress
        result = RLResult(output=self.output, global_step=p.global_step)
        t_start = time.perf_counter()
        last_saved = None
        if cfg.eval.at_start and p.global_step == 0:
            self.metrics.event("eval", step=0, **self.evaluate())
        # Without max_steps the run ends with its epochs (a step with extra rollout calls
        # consumes several prompt batches, so an epoch may hold fewer RL steps).
        while p.global_step < self.stop_step and (tr.max_steps or p.epoch < tr.epochs):
            while p.step_in_epoch < self.steps_per_epoch and p.global_step < self.stop_step:
                prompts = self.step_prompts(p.step_in_epoch, p.epoch)
                stats = self._train_step(p.global_step, prompts)
                p.step_in_epoch += stats["rollout_calls"]
                p.global_step += 1
                p.samples_seen += stats["prompts"]
                p.tokens_seen += stats["tokens"]
                if stats["skipped"]:
                    p.skipped_steps += 1
                    logger.info("RL step %d skipped: %s", p.global_step, stats["skip_reason"])
                else:
                    p.optimizer_steps += stats["updates"]
                    if not math.isfinite(stats["loss"]):
                        raise FloatingPointError(f"loss is {stats['loss']} at step {p.global_step}")
                stats.update(
                    epoch=p.epoch,
                    optimizer_steps=p.optimizer_steps,
                    skipped_steps=p.skipped_steps,
                    elapsed_s=time.perf_counter() - t_start,
                )
                result.rewards.append(stats["reward_mean"])
                if cfg.eval.every and p.global_step % cfg.eval.every == 0:
                    stats.update(self.evaluate())
                updates = stats.pop("update_metrics", [])
                if p.global_step % tr.log_every == 0 or p.global_step == self.stop_step:
                    for rec in updates:
                        self.metrics.event(UPDATE_EVENT, step=p.global_step, **rec)
                    self.metrics.log(p.global_step, stats)
                self.metrics.advance()
                if tr.save_every and p.global_step % tr.save_every == 0:
                    result.checkpoint = self.save_checkpoint()
                    last_saved = p.global_step
            if p.step_in_epoch >= self.steps_per_epoch:
                p.epoch += 1
                p.step_in_epoch = 0
        if last_saved != p.global_step:
            result.checkpoint = self.save_checkpoint()
        if tr.export:
            result.export = self.export()
        result.global_step = p.global_step
        result.seconds = time.perf_counter() - t_start
        self.metrics.event("end", step=p.global_step, seconds=result.seconds)
        return result

    def evaluate(self) -> dict[str, float]:
        """Mean reward / accuracy / format rate on the held-out prompts (eval.data)."""
        with self._gathered():
            return evaluate_on_ranks(
                self.model,
                self.processor,
                self.reward_fn,
                self.cfg,
                rank=self.rank,
                world=self.world,
                device=self.device,
                latent_size=self.latent_size,
                latent_layout=self.latent_layout,
                ban=self.ban,
                use_cuda_graphs=self.decode_graphs,
            )

    def cleanup(self) -> None:
        super().cleanup()
        if self.ref_engine is not None and hasattr(self.ref_engine, "destroy"):
            self.ref_engine.destroy()
        self.ref_engine = None
        self.ref_model = None


if __name__ == "__main__":  # `python -m monet_fast.train.vlpo` (what torchrun / deepspeed launch)
    # The entry lives with the CLI (rl_cli.main): the recipe never imports its command line.
    from monet_fast.train.rl_cli import main

    sys.exit(main())


__all__ = ["VLPORecipe"]
