"""The VLPO recipe end to end on the tiny model, one CPU process through DeepSpeed ZeRO-2:
ratio 1 / zero KL on the first update, degenerate groups, accumulation-split invariance, exact
resume, the shipped configs, the CLI, and (slow) a seeded reward improvement on held-out prompts.

The policy is the tiny model after a few SFT stage-3 steps (the SFT trainer's Python API), so it
answers the synthetic task partly and opens latent blocks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monet_fast.train.config import ConfigError
from monet_fast.train.metrics import read_metrics
from monet_fast.train.rewards import RewardResult
from monet_fast.train.rl_cli import build_rl_config, rl
from monet_fast.train.vlpo import VLPORecipe
from monet_fast.train.vlpo_config import load_rl_config
from monet_fast.train.vlpo_module import VLPOTrainModule, score_steps

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "vlpo.yaml"
CONFIG_7B = ROOT / "configs" / "qwen2_5_vl_7b" / "vlpo.yaml"

# Small RL steps: 4 prompts x 4 responses, two optimizer steps (2 groups each) per RL step, one
# rollout call per step (the filter's pool is tested in test_online_filter_pools_...).
FAST = [
    "logging.progress=false",
    "model.latent_size=4",  # as the SFT fixture
    "data.n=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=40",
    "trainer.mini_batch_prompts=2",
    "trainer.micro_batch_size=16",
    "trainer.export=false",
    "filter.max_extra_rollouts=0",
]
ONE_UPDATE = "trainer.mini_batch_prompts=4"
TIMING = {"rollout_s", "score_s", "update_s", "step_s", "elapsed_s"}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """Tiny model after 40 SFT stage-3 steps (seeded): well-formed answers, chance-level letters."""
    from monet_fast.train.sft import train

    out = tmp_path_factory.mktemp("sft")
    train(
        3,
        ROOT / "configs" / "tiny" / "stage3.yaml",
        [
            "data.n=256",
            "model.latent_size=4",
            "optim.lr=3e-3",
            "teacher.mode=online",
            "loss.align_weight=0",  # the tiny teacher is random: CE only
            "trainer.micro_batch_size=8",
            "trainer.grad_accum=1",
            "scheduler.name=constant",
            "scheduler.warmup_steps=0",
            "logging.progress=false",
        ],
        output=out,
        max_steps=40,
    )
    return out / "hf"


def _rl(tmp_path, init, *overrides, name="run", max_steps=1, resume=None):
    out = tmp_path / name
    result = rl(
        CONFIG, [*FAST, *overrides], output=out, init=init, max_steps=max_steps, resume=resume
    )
    return result, read_metrics(out)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- first update


def test_first_update_has_ratio_one_and_zero_kl(tmp_path, sft_model):
    result, metrics = _rl(tmp_path, sft_model, "filter.enabled=false", ONE_UPDATE)
    (m,) = metrics
    assert m["skipped"] == 0 and m["updates"] == 1 and result.global_step == 1
    assert m["token_steps"] > 0 and m["latent_steps"] > 0
    # Unchanged weights: new == old log-probs, policy == reference.
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-9)
    assert m["clip_frac"] == 0.0
    # Correct pairing: the mean that produced each latent is recomputed exactly (logp 0).
    assert abs(m["latent_logp_mean"]) < 1e-8 and m["grad_norm"] > 0
    for key in (
        "reward_mean",
        "reward_std",
        "accuracy",
        "group_keep_rate",
        "rollout_s",
        "update_s",
    ):
        assert key in m


def test_several_updates_per_rollout_batch_start_on_policy(sft_model):
    """Pre-update log-probs (score_steps) give ratio 1 / KL 0 on the first mini-batch; after an
    optimizer step the same rollouts have ratio != 1 and KL > 0."""
    from monet_fast.data import make_samples
    from monet_fast.model.loading import load_pretrained
    from monet_fast.train.rollout import (
        BanTokens,
        build_replay_batch,
        default_ban_ids,
        generate_rollouts,
    )
    from monet_fast.train.vlpo_config import ObjectiveSection

    model, processor = load_pretrained(sft_model)
    ref, _ = load_pretrained(sft_model)
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    ros = generate_rollouts(
        model,
        processor,
        make_samples(2, 7),
        group_size=4,
        max_new_tokens=40,
        latent_size=4,
        temperature=0.5,
        top_p=0.99,
        seed=3,
        ban=ban,
    )
    for i, r in enumerate(ros):
        r.advantage = [1.0, -1.0, 0.5, -0.5][i % 4]
    rb = build_replay_batch(ros, processor, 4)
    assert rb.n_latent_steps > 0
    old = score_steps(model, rb, temperature=0.5, sigma=10.0, ban=ban)
    ref_scores = score_steps(ref, rb, temperature=0.5, sigma=10.0, ban=ban)
    module = VLPOTrainModule(model, ObjectiveSection(), 0.5, ban)
    out = module(rb, old, ref_scores, scale=1.0 / rb.n_steps)
    for t in out["terms"]:
        torch.testing.assert_close(t.ratio, torch.ones_like(t.ratio), rtol=0, atol=1e-6)
        assert t.kl.abs().max() < 1e-9
    out["objective"].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = module(rb, old, ref_scores, scale=1.0)
    ratios = torch.cat([t.ratio for t in after["terms"]])
    assert (ratios - 1).abs().max() > 1e-4 and sum(float(t.kl.sum()) for t in after["terms"]) > 0


# ------------------------------------------------------------------------------- degenerate groups


def _recipe(tmp_path, init, *overrides, name="run"):
    cfg = build_rl_config(CONFIG, [*FAST, *overrides], output=tmp_path / name, init=init)
    recipe = VLPORecipe(cfg)
    recipe.setup()
    return recipe


def test_degenerate_groups_are_dropped_and_an_empty_step_is_skipped(tmp_path, sft_model):
    recipe = _recipe(tmp_path, sft_model, "trainer.max_steps=2")
    try:
        calls = {"n": 0}

        def all_same(text, sample, info):  # step 1: every answer right; step 2: every one wrong
            calls["n"] += 1
            ok = calls["n"] <= 16
            return RewardResult(reward=float(ok), correct=ok, format_ok=True)

        recipe.reward_fn = all_same
        before = _weights(recipe.model)
        result = recipe.train()
        after = _weights(recipe.model)
    finally:
        recipe.cleanup()
    metrics = read_metrics(tmp_path / "run")
    assert result.global_step == 2 and [m["step"] for m in metrics] == [1, 2]
    assert [m["accuracy"] for m in metrics] == [1.0, 0.0]
    for m in metrics:
        assert m["skipped"] == 1 and m["skip_reason"] == "no usable group"
        assert m["groups_kept"] == 0 and m["group_keep_rate"] == 0.0 and m["adv_abs_mean"] == 0.0
    assert metrics[-1]["optimizer_steps"] == 0 and metrics[-1]["skipped_steps"] == 2
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_without_filtering_equal_rewards_give_zero_policy_gradient(tmp_path, sft_model):
    recipe = _recipe(tmp_path, sft_model, "trainer.max_steps=1", "filter.enabled=false", ONE_UPDATE)
    try:
        recipe.reward_fn = lambda text, sample, info: RewardResult(0.1, False, True)
        recipe.train()
    finally:
        recipe.cleanup()
    (m,) = read_metrics(tmp_path / "run")
    assert m["skipped"] == 0 and m["groups_kept"] == 4
    assert m["adv_abs_mean"] == 0.0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0


# ------------------------------------------------------------------------------- accumulation, resume


@pytest.mark.slow  # ~3.5 s on 2 busy cores: two VLPO runs
def test_micro_batch_split_gives_the_same_update(tmp_path, sft_model):
    """SGD (update = lr x grad, no clipping/decay) exposes any normalisation error."""
    sgd = ["optim.name=sgd", "optim.lr=0.5", "optim.grad_clip=0", "optim.weight_decay=0"]
    sgd += ["filter.enabled=false", "trainer.export=true"]
    from safetensors.torch import load_file

    exports = []
    for mbs in (16, 3):
        res, metrics = _rl(
            tmp_path, sft_model, *sgd, f"trainer.micro_batch_size={mbs}", name=f"m{mbs}"
        )
        exports.append(load_file(res.export / "model.safetensors"))
        assert metrics[0]["updates"] == 2
    init = load_file(Path(sft_model) / "model.safetensors")
    a, b = exports
    for k in a:
        # fp32 sums over differently split micro-batches: rounding-level differences only.
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(a[k], init[k]) for k in a) > 10


@pytest.mark.slow  # ~4 s on 2 busy cores: three VLPO runs with checkpoints
def test_resume_reproduces_the_uninterrupted_run(tmp_path, sft_model, monkeypatch):
    args = ["trainer.save_every=2", "trainer.export=true", "optim.lr=1e-3", "data.n=12"]
    # 12 prompts / 4 per step = 3 steps per epoch: the 4-step run crosses an epoch boundary.
    full, want = _rl(tmp_path, sft_model, *args, name="full", max_steps=4)

    calls = {"n": 0}
    original = VLPORecipe._train_step

    def crash_on_third_step(self, step, prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, step, prompts)

    monkeypatch.setattr(VLPORecipe, "_train_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        _rl(tmp_path, sft_model, *args, name="cut", max_steps=4)
    monkeypatch.setattr(VLPORecipe, "_train_step", original)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_0000002"

    resumed, got = _rl(tmp_path, sft_model, *args, name="cut", max_steps=4, resume=True)
    assert resumed.global_step == 4 and len(resumed.rewards) == 2
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert sum(m["updates"] for m in want if not m["skipped"]) >= 2  # the run did train
    for w, g in zip(want, got):
        for key in w.keys() - TIMING:
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), key
            else:
                assert g[key] == w[key], key
    from safetensors.torch import load_file

    a = load_file(full.export / "model.safetensors")
    b = load_file(resumed.export / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "variant",
    [
        ["ref.mode=offload"],
        ["ref.mode=zero3"],
        ["deepspeed.zero_stage=3"],  # rollouts on gathered ZeRO-3 parameters
    ],
    ids=["ref-offload", "ref-zero3", "policy-zero3"],
)
@pytest.mark.slow
def test_reference_placement_and_zero3_policy_give_the_same_run(tmp_path, sft_model, variant):
    args = ["optim.lr=1e-3", "filter.enabled=false"]
    _, want = _rl(tmp_path, sft_model, *args, name="base", max_steps=2)
    _, got = _rl(tmp_path, sft_model, *args, *variant, name="variant", max_steps=2)
    assert want[1]["kl"] > 0
    for w, g in zip(want, got):
        for key in ("reward_mean", "loss", "kl", "latent_logp_mean", "grad_norm"):
            # ZeRO-3 gathers/partitions in a different order: fp32 rounding only.
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-7), key


# ------------------------------------------------------------------------------- the latent term


def _independent_means(model, replay, token_ids) -> list[torch.Tensor]:
    """Per rollout of a replay, the means of its latent steps from a plain HF forward (not the
    latent forward): the rollout's latents replace the input embeddings of the latent-slot ids of
    its closed blocks, and mu_k = the post-norm last hidden state one position before slot k (the
    position whose output was fed into slot k at rollout)."""
    b = replay.batch
    ids = b.input_ids
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).clone()
        slots = []
        for row, r in enumerate(replay.rollouts):
            pos = (ids[row] == token_ids.latent_pad).nonzero().flatten()[: r.latents.shape[0]]
            emb[row, pos] = r.latents.to(emb.dtype)
            slots.append(pos)
        hidden = model.model(
            input_ids=ids,
            inputs_embeds=emb,
            attention_mask=b.attention_mask,
            pixel_values=b.pixel_values,
            image_grid_thw=b.image_grid_thw,
            mm_token_type_ids=b.mm_token_type_ids,
        ).last_hidden_state
    return [hidden[row, pos - 1].double() for row, pos in enumerate(slots)]


def _latent_objective64(mu, z, adv, n_steps, sigma, kl_coef=0.01, clip=(0.2, 0.3, 3.0)):
    """The latent steps' share of the objective in float64, from the formulas (REFERENCE.md §5):
    logp = -||z - mu||^2 / (2 sigma^2); old and reference log-probs are 0 (both are the weights
    that rolled out z = their own mean); clipped ratio with dual clip; low-variance KL; summed
    and divided by the update's token + latent steps. Returns (objective, logp, ratio, clipped)."""
    lo, hi, dual = clip
    logp = -((z - mu) ** 2).sum(-1) / (2 * sigma**2)
    ratio = torch.exp(torch.clamp(logp, -10, 10))
    clipped_ratio = torch.exp(torch.clamp(logp, math.log(1 - lo), math.log(1 + hi)))
    pg = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual), pg)
    k = torch.clamp(-logp, -10, 10)
    kl = torch.clamp(torch.exp(k) - k - 1, -10, 10)
    clipped = -adv * ratio < -adv * clipped_ratio
    return (pg + kl_coef * kl).sum() / n_steps, logp.detach(), ratio.detach(), clipped


def test_second_update_latent_gradient_matches_a_float64_computation(
    tmp_path, sft_model, monkeypatch
):
    """One rollout batch, two updates, sigma 2 (not the default, so a hard-coded sigma fails).
    On update 2 the gradient of the objective w.r.t. the latent means equals d/dmu of the
    float64 formula, at means recomputed by an independent forward with the pairing written out;
    on update 1 it is 0. The logged per-update metrics match their definitions."""
    from monet_fast.model.tokens import TokenIds
    from monet_fast.train import vlpo_module as vlpo_mod
    from monet_fast.train.vlpo_metrics import read_update_metrics

    sigma = 2.0
    recipe = _recipe(
        tmp_path, sft_model, "trainer.max_steps=1", "filter.enabled=false", f"vlpo.sigma={sigma}"
    )
    tid = TokenIds.from_tokenizer(recipe.processor.tokenizer)
    calls: list[dict] = []
    real_forward, real_logprobs = VLPOTrainModule.forward, vlpo_mod.step_logprobs

    def forward(self, replay, old=None, ref=None, *, scale=1.0):
        mu = _independent_means(self.model, replay, tid)
        calls.append(dict(replay=replay, old=old, ref=ref, scale=scale, mu_indep=mu))
        return real_forward(self, replay, old, ref, scale=scale)

    def logprobs(*args, **kwargs):
        out = real_logprobs(*args, **kwargs)
        if out.mu.requires_grad:  # the update's forward (scoring runs without grad)
            out.mu.retain_grad()
            calls[-1]["mu"] = out.mu
        return out

    monkeypatch.setattr(VLPOTrainModule, "forward", forward)
    monkeypatch.setattr(vlpo_mod, "step_logprobs", logprobs)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    assert len(calls) == 2  # two updates of one micro-batch each
    updates = read_update_metrics(tmp_path / "run")
    assert [u["update_in_rollout"] for u in updates] == [0, 1]
    grads = []
    for call, rec in zip(calls, updates):
        ros = call["replay"].rollouts
        z = torch.cat([r.latents for r in ros]).double()
        adv = torch.cat([torch.full((r.latents.shape[0],), r.advantage) for r in ros]).double()
        assert z.shape[0] > 0 and adv.abs().max() > 0
        # Old and reference log-probs: the pre-update weights rolled these latents out.
        for frozen in (call["old"].latent, call["ref"].latent):
            assert frozen.abs().max() < 1e-6
        n_steps = call["replay"].n_steps
        assert call["scale"] == pytest.approx(1.0 / n_steps)  # one micro-batch, one rank
        mu64 = torch.cat(call["mu_indep"])
        torch.testing.assert_close(call["mu"].detach().double(), mu64, rtol=1e-4, atol=1e-4)
        mu64.requires_grad_(True)
        objective, logp, ratio, clipped = _latent_objective64(mu64, z, adv, n_steps, sigma)
        (want,) = torch.autograd.grad(objective, mu64)
        got = call["mu"].grad
        assert got is not None, "the latent term does not reach the means"
        grads.append((got.double(), want))
        # Per-update metrics, as defined in vlpo_metrics.
        assert rec["latent_steps"] == z.shape[0]
        assert rec["latent_loss"] == pytest.approx(objective.item(), rel=1e-4, abs=1e-9)
        assert rec["latent_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-6)
        assert rec["latent_kl"] == pytest.approx(float(-logp.mean()), rel=1e-3, abs=1e-9)
        assert rec["latent_clipfrac"] == pytest.approx(float(clipped.double().mean()))
    (got1, want1), (got2, want2) = grads
    print(f"update 2: |dL/dmu| max {want2.abs().max():.3e}, latent metrics {updates[1]}")
    # Update 1: the means are the rollout latents, the gradient vanishes.
    assert got1.abs().max() < 1e-3 * want2.abs().max()
    # Update 2: the term acts, and with the formula's value.
    assert updates[1]["latent_kl"] > 0 and updates[1]["latent_ratio_mean"] != 1.0
    assert want2.abs().max() > 1e-8
    torch.testing.assert_close(got2, want2, rtol=1e-3, atol=1e-3 * float(want2.abs().max()))


@pytest.mark.slow  # ~4 s on 2 busy cores: four VLPO runs
def test_sigma_changes_a_two_update_run_and_not_a_one_update_run(tmp_path, sft_model):
    """The latent term acts from the second update of a rollout batch on: the policy after two
    updates depends on sigma; after one (on-policy, zero latent gradient) it does not. SGD:
    Adam's first step (about lr x sign(grad)) turns rounding-level differences into lr-sized ones.
    """
    sgd = ["optim.name=sgd", "optim.lr=0.5", "optim.grad_clip=0", "optim.weight_decay=0"]
    finals = {}
    for updates in ("two", "one"):
        for sigma in (1.0, 10.0):
            extra = [ONE_UPDATE] if updates == "one" else []
            name = f"{updates}-{sigma}"
            recipe = _recipe(
                tmp_path, sft_model, "trainer.max_steps=1", "filter.enabled=false",
                f"vlpo.sigma={sigma}", *sgd, *extra, name=name,
            )  # fmt: skip
            try:
                recipe.train()
                finals[name] = _weights(recipe.model)
            finally:
                recipe.cleanup()

    def max_diff(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    two, one = (max_diff(finals[f"{n}-1.0"], finals[f"{n}-10.0"]) for n in ("two", "one"))
    assert two > 1e-4 and one < 1e-6, (two, one)  # measured: 2.2e-3 and 1.2e-7 (1 ulp)


# ------------------------------------------------------------------------------- online filter pool


def test_online_filter_pools_groups_across_rollout_calls(tmp_path, sft_model):
    """Deterministic rewards by rollout call: call 0 gives 1 usable group of 4, call 1 two, call
    2 all four -> step 1 keeps 4 (quota met) from 3 calls over the epoch's first 3 prompt
    batches; step 2 starts at the 4th (last) batch, keeps 1, finds no more prompts and says so."""
    from monet_fast.train.data import epoch_order

    recipe = _recipe(tmp_path, sft_model, "trainer.max_steps=2", "filter.max_extra_rollouts=3")
    mixed = {0: {0}, 1: {0, 1}, 2: {0, 1, 2, 3}, 3: {0}}  # usable groups per rollout call
    seen: list[str] = []
    try:

        def reward(text, sample, info):
            n = len(seen)
            seen.append(sample.key)
            call, group, member = n // 16, n % 16 // 4, n % 4
            ok = group in mixed[call] and member == 0  # 1 of 4 right: accuracy .25 passes
            return RewardResult(reward=float(ok), correct=ok, format_ok=True)

        recipe.reward_fn = reward
        result = recipe.train()
        epoch = recipe.progress.epoch
    finally:
        recipe.cleanup()
    m1, m2 = read_metrics(tmp_path / "run")
    assert result.global_step == 2 and len(seen) == 4 * 16
    assert (m1["rollout_calls"], m1["groups"], m1["groups_kept"], m1["skipped"]) == (3, 12, 4, 0)
    assert m1["pool_reason"] == "quota met" and m1["updates"] == 2
    assert m1["group_keep_rate"] == pytest.approx(7 / 12)
    assert (m2["rollout_calls"], m2["groups_kept"], m2["updates"]) == (1, 1, 1)
    assert "no more prompts" in m2["pool_reason"]
    # Extra calls read the epoch's next prompt batches, in order; the epoch is used up.
    order = epoch_order(16, 42, 0, True)
    keys = [recipe.samples[i].key for i in order]
    assert [seen[i] for i in range(0, 64, 4)] == keys and epoch == 1


# ------------------------------------------------------------------------------- configs, CLI


def test_shipped_configs_load_and_the_7b_one_mirrors_the_reference():
    tiny = load_rl_config(CONFIG)
    assert tiny.model.latent_size == 8 and tiny.trainer.max_steps
    # Several updates per rollout batch, so the latent term acts (it has no gradient on the first).
    assert tiny.rollout.prompts_per_step // tiny.trainer.mini_batch_prompts >= 2
    cfg = load_rl_config(CONFIG_7B, ["model.init=/models/monet-sft-stage3"])
    r, o, f, rw = cfg.rollout, cfg.vlpo, cfg.filter, cfg.reward
    assert (r.group_size, r.temperature, r.top_p, cfg.model.latent_size) == (8, 0.5, 0.99, 10)
    assert (o.sigma, o.clip_low, o.clip_high, o.clip_ratio_dual) == (10.0, 0.2, 0.3, 3.0)
    assert (o.kl_coef, o.kl_type, o.latent_pairing, o.latent_term) == (
        0.01,
        "low_var_kl",
        "correct",
        True,
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.grad_clip) == ("adamw", 1e-6, 1.0)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == ("constant", 0)
    assert (rw.correct_weight, rw.format_weight, rw.format_rule) == (0.9, 0.1, "boxed")
    assert (f.enabled, f.acc_low, f.acc_high, f.max_extra_rollouts) == (True, 0.0, 0.6, 3)
    assert rw.judge.base_url is None  # judge-free by default
    assert (r.prompts_per_step, cfg.trainer.mini_batch_prompts) == (64, 16)


@pytest.mark.parametrize(
    "override, match",
    [
        (["ref.mode=none"], "ref.mode none.*kl_coef"),
        (["vlpo.latent_pairing=shifted"], "latent_pairing must be one of"),
        (["filter.acc_low=0.7"], "acc_low < acc_high"),
        (["filter.max_extra_rollouts=-1"], "filter.max_extra_rollouts must be >= 0"),
        (["rollout.top_p=0"], "top_p"),
        (["reward.functions=[{name: nodots}]"], "package.module:function"),
        (["reward.judge.base_url=http://localhost:1/v1"], "judge.model"),
        (["rollout.groupsize=4"], "did you mean 'group_size'"),
    ],
)
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_rl_config(CONFIG, override)


def test_too_few_prompts_and_existing_runs_are_refused(tmp_path, sft_model):
    with pytest.raises(ConfigError, match="fewer than one RL step"):
        _rl(tmp_path, sft_model, "data.n=3", name="small")
    _rl(tmp_path, sft_model, name="done")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _rl(tmp_path, sft_model, name="done")


@pytest.mark.slow
def test_cli_runs_from_an_sft_run_directory(tmp_path, sft_model):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.pop("MASTER_PORT", None)
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "monet_fast.cli", "rl", "--config", str(CONFIG)]
        + ["--init", str(Path(sft_model).parent), "--output", str(out), "--max-steps", "1"]
        + [o for o in FAST if not o.startswith("trainer.export")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VLPO ran to step 1" in proc.stdout
    assert (out / "hf" / "config.json").is_file() and len(read_metrics(out)) == 1


# ------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_a_short_seeded_run_improves_held_out_reward(tmp_path, sft_model):
    """Held-out prompts (indices 100000+, never rolled out), 4 samples each at the rollout
    temperature, before and after 6 RL steps of 8 prompts x 8 responses, on the two-option
    variant of the synthetic task. The SFT model (trained on four options) solves it partly: it
    often answers an option that is not offered, or no boxed letter at all. VLPO raises the reward
    by answering among the offered options in the expected format; the tiny model does not learn
    the visual skill (colour) in these few steps."""
    two = "{n_choices: 2}"
    result, metrics = _rl(
        tmp_path,
        sft_model,
        f"data.synthetic={two}",
        f"eval.data.synthetic={two}",
        "rollout.prompts_per_step=8",
        "rollout.group_size=8",
        "rollout.max_new_tokens=48",
        "trainer.mini_batch_prompts=4",  # 2 updates per rollout batch
        "data.n=64",
        "optim.lr=2e-4",
        "eval.at_start=true",
        "eval.every=6",
        max_steps=6,
    )
    import json

    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = next(e for e in events if e.get("event") == "eval")
    after = metrics[-1]
    print(
        f"held-out reward {before['eval_reward']:.3f} -> {after['eval_reward']:.3f}, accuracy "
        f"{before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, format "
        f"{before['eval_format_rate']:.3f} -> {after['eval_format_rate']:.3f}"
    )
    assert after["eval_n"] == before["eval_n"] == 128
    assert sum(m["updates"] for m in metrics if not m["skipped"]) >= 5
    assert after["eval_reward"] > before["eval_reward"] + 0.05
    assert after["eval_accuracy"] > before["eval_accuracy"]
