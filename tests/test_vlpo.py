"""VLPO pieces against hand-computed values and the reference formulas (REFERENCE.md §5, oracles
15-19): GRPO advantages, the clipped token/latent objective, low-variance KL, the difficulty
filter, rewards, and the rollout -> replay step layout on the tiny model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from monet_fast.kernels import gaussian_logprob

from monet_fast.data import make_samples
from monet_fast.model.tokens import TokenIds
from monet_fast.tasks.judge import JudgeError
from monet_fast.train import grpo
from monet_fast.train import rewards as R
from monet_fast.train.rollout import (
    BanTokens,
    Rollout,
    build_replay_batch,
    default_ban_ids,
    generate_rollouts,
    step_counts,
    step_logprobs,
)

CLIP = grpo.ClipConfig(0.2, 0.3, 3.0)
K = 3


@functools.cache
def _tiny():
    from monet_fast.model.tiny import tiny_model

    # A wide init range so a random model's text and latents depend on the inputs.
    model, processor = tiny_model(0, latent_size=K, initializer_range=0.2)
    return model.eval(), processor


# ------------------------------------------------------------------------------- advantages


def test_group_advantages_match_the_reference_example():
    # Oracle 16: scores [1, 0, 0, 1] -> mean .5, unbiased std .57735 -> A = +-0.866025.
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    want = torch.tensor([1, -1, -1, 1]) * 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(adv, want.float())
    assert abs(adv[0].item() - 0.866025) < 1e-5


def test_group_advantages_are_per_group_and_zero_for_degenerate_groups():
    rewards = torch.tensor([1.0, 0.1, 0.9, 0.9, 0.0, 0.0, 0.7])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    adv = grpo.group_advantages(rewards, groups)
    # group 0: mean .55, std = |1 - .1| / sqrt(2) = .636396
    a = 0.45 / (0.9 / math.sqrt(2) + 1e-6)
    torch.testing.assert_close(adv[:2], torch.tensor([a, -a]))
    # all correct, all wrong: std 0 -> (R - mean) / eps = 0; a group of one: 0 (not NaN).
    assert adv[2:].tolist() == [0.0] * 5


def test_group_accuracy_and_the_difficulty_band():
    acc = grpo.group_accuracy(torch.tensor([1, 0, 1, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert acc == {0: 0.5, 1: 1.0, 2: 0.0}
    # Reference: keep prompts with >= 1 correct and accuracy <= 0.6, i.e. (0, 0.6].
    verdicts = [grpo.keep_group(a) for a in (0.0, 0.125, 0.5, 0.6, 5 / 8, 1.0)]
    assert verdicts == [False, True, True, True, False, False]
    assert grpo.keep_group(0.2, low=0.25, high=1.0) is False


# ------------------------------------------------------------------------------- objective


def test_clipped_token_objective_matches_the_reference_example():
    # Oracle 17 (clip .2/.3, dual 3): A=1, logp-old=.5 -> ratio 1.6487, clipped to 1.3 -> -1.3;
    # A=-1, logp-old=2 -> ratio 7.389 -> max(7.389, 1.3) -> dual min(7.389, 3) = 3.
    logp = torch.tensor([0.5, 2.0, 0.1, -0.1], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    t = grpo.token_terms(logp, old, adv, CLIP)
    want = [-1.3, 3.0, -math.exp(0.1), math.exp(-0.1)]
    torch.testing.assert_close(t.loss, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert t.clipped.tolist() == [True, False, False, False]
    assert t.dual_clipped.tolist() == [False, True, False, False]
    t.loss.sum().backward()
    # Clipped steps give no gradient; unclipped ones d(-A r)/dlogp = -A r.
    torch.testing.assert_close(
        logp.grad, torch.tensor([0.0, 0.0, -math.exp(0.1), math.exp(-0.1)]), rtol=1e-6, atol=1e-6
    )


def test_low_var_kl_matches_the_reference_formula():
    # Oracle 18: k = clamp(ref - lp, +-10); exp(k) - k - 1 clamped to [-10, 10]; equal -> 0.
    lp = torch.tensor([-1.0, -2.0, 0.0, -30.0])
    ref = torch.tensor([-1.0, -1.5, -0.5, 0.0])
    kl = grpo.low_var_kl(lp, ref)
    want = [0.0, math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, 10.0]  # last: exp(10)-11 clamped
    torch.testing.assert_close(kl, torch.tensor(want))


def test_latent_term_uses_the_fused_kernel_and_equals_the_reference_formula(monkeypatch):
    calls = []
    real = grpo.latent_policy_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "latent_policy_loss", spy)
    g = torch.Generator().manual_seed(0)
    n, h, sigma = 5, 24, 10.0
    z = torch.randn(n, h, generator=g) * 3
    mu0 = z + torch.randn(n, h, generator=g) * 2
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0])
    old = torch.tensor([-0.3, -0.1, -0.5, -0.2, -0.4])
    ref = torch.tensor([-0.2, -0.4, -0.1, -0.3, -0.2])
    for dtype in (torch.float32, torch.bfloat16):
        mu = mu0.to(dtype).clone().requires_grad_(True)
        t = grpo.latent_terms(mu, z.to(dtype), old, adv, CLIP, sigma, ref, kl_coef=0.01)
        assert t.kind == "latent" and t.logp.dtype == torch.float32
        # Reference formula (oracle 15) in float64 on the same (rounded) inputs.
        m64, z64 = mu.detach().double(), z.to(dtype).double()
        want_logp = -0.5 * ((z64 - m64) ** 2).sum(-1) / sigma**2
        torch.testing.assert_close(t.logp.double(), want_logp, rtol=1e-6, atol=1e-6)
        # Whole per-step loss and its gradient against plain autograd of the formulas.
        m = mu.detach().double().requires_grad_(True)
        lp = -0.5 * ((z64 - m) ** 2).sum(-1) / sigma**2
        ratio = torch.exp(torch.clamp(lp - old.double(), -10, 10))
        clipped = torch.exp(torch.clamp(lp - old.double(), math.log(0.8), math.log(1.3)))
        a = adv.double()
        pg = torch.maximum(-a * ratio, -a * clipped)
        pg = torch.where(a < 0, torch.minimum(pg, -a * 3.0), pg)
        k = torch.clamp(ref.double() - lp, -10, 10)
        want = pg + 0.01 * torch.clamp(torch.exp(k) - k - 1, -10, 10)
        torch.testing.assert_close(t.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        t.loss.sum().backward()
        want.sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 gradient storage
        torch.testing.assert_close(mu.grad.double(), m.grad, rtol=tol, atol=tol)
    assert len(calls) == 2


def test_latent_gradient_vanishes_at_the_rollout_mean():
    """Rollout latents are the Gaussian mean (deterministic), so at the rollout policy
    d log N(z; mu, s^2) / d mu = (z - mu) / s^2 = 0: the latent term starts to act only once
    mu has moved away from z (later mini-batches of a rollout batch)."""
    z = torch.randn(4, 16)
    mu = z.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    t = grpo.latent_terms(mu, z, torch.zeros(4), adv, CLIP, 10.0)
    (g,) = torch.autograd.grad(t.loss.sum(), mu)
    assert g.abs().max() == 0
    moved = (z + 0.5).requires_grad_(True)
    t = grpo.latent_terms(moved, z, torch.zeros(4), adv, CLIP, 10.0)
    (g,) = torch.autograd.grad(t.loss.sum(), moved)
    # Positive advantage pulls mu back towards z (gradient descent direction = z - mu).
    assert (-g[0] * (z[0] - moved[0].detach())).sum() > 0


# ------------------------------------------------------------------------------- rewards


def _sample(answer="B", choices=("red", "blue")):
    s = make_samples(1, 0, n_choices=len(choices))[0]
    s.answer, s.choices = answer, list(choices)
    return s


def test_reward_is_point_nine_correct_plus_point_one_boxed():
    # Oracle 19 without the API: correct + boxed -> 1.0; wrong, no box -> 0 (reference: -0.9
    # only when its API flags repetition).
    fn = R.MonetReward()
    s = _sample("B")
    assert fn("... so the answer is \\boxed{B}", s).reward == pytest.approx(1.0)
    assert fn("... so the answer is \\boxed{A}", s).reward == pytest.approx(0.1)
    r = fn("The answer is B.", s)
    assert (r.correct, r.format_ok, r.reward) == (True, False, pytest.approx(0.9))
    assert fn("no idea", s).reward == 0.0
    assert fn("<abs_vis_token>x \\boxed{B} y</abs_vis_token> done", s).format_ok is False


def test_latent_format_rule_and_pluggable_functions():
    s = _sample("A")
    good = "look <abs_vis_token><abs_vis_token_pad></abs_vis_token> so \\boxed{A}"
    assert R.format_ok(good, s, "latent_boxed")
    assert not R.format_ok("so \\boxed{A}", s, "latent_boxed")  # no latent block
    assert not R.format_ok("<abs_vis_token><abs_vis_token_pad> \\boxed{A}", s, "latent_boxed")
    assert not R.format_ok("<abs_vis_token></abs_vis_token> \\boxed{Z}", s, "latent_boxed")
    fn = R.MonetReward(
        format_rule="latent_boxed",
        extra=[
            ("monet_fast.train.rewards:latent_block_bonus", 0.25),
            (lambda t, s, i: i.n_tokens / 10, 2.0),
        ],
    )
    res = fn(good, s, R.RolloutInfo(n_tokens=5))
    assert res.reward == pytest.approx(0.9 + 0.1 + 0.25 + 2.0 * 0.5)
    assert res.parts["correct"] == 1.0 and res.parts["latent_block_bonus"] == 1.0
    with pytest.raises(ValueError, match="package.module:function"):
        R.resolve_reward_fn("not_a_path")
    with pytest.raises(ValueError, match="cannot load"):
        R.resolve_reward_fn("monet_fast.nope:fn")


def test_judge_is_asked_only_when_the_rules_say_wrong_and_failures_keep_the_rule_verdict():
    asked = []

    def judge(question, prediction, gold):
        asked.append(prediction)
        if "fail" in prediction:
            raise JudgeError("endpoint down")
        return True

    fn = R.MonetReward(judge=judge)
    s = _sample("B")
    assert fn("\\boxed{B}", s).judge is None and not asked
    r = fn("\\boxed{the second one}", s)
    assert r.correct and r.judge == "correct" and r.reward == pytest.approx(1.0)
    r = fn("\\boxed{fail}", s)
    assert not r.correct and r.judge == "error" and r.reward == pytest.approx(0.1)
    assert R.build_judge(None, None) is None  # default: no service
    j = R.build_judge("http://localhost:9/v1", "judge-model", timeout=2.0, retries=1)
    assert (j.url, j.timeout, j.retries) == ("http://localhost:9/v1/chat/completions", 2.0, 1)
    # An unreachable endpoint costs retries, then the rule verdict stands.
    j.backoff = 0.0
    r = R.MonetReward(judge=j)("\\boxed{A}", s)
    assert (r.correct, r.judge, j.n_requests) == (False, "error", 2)


# ------------------------------------------------------------------------------- replay layout


def _manual_rollout(processor, response: list[int], n_latents: int, truncated=False) -> Rollout:
    sample = make_samples(1, 0)[0]
    hidden = _tiny()[0].config.text_config.hidden_size
    return Rollout(
        sample=sample,
        group=0,
        prompt="",
        response_ids=torch.tensor(response),
        text="",
        latents=torch.randn(n_latents, hidden),
        n_blocks=n_latents // K,
        truncated_block=truncated,
        finish_reason="eos",
    )


def test_replay_steps_count_sampled_tokens_and_pair_latents_with_the_previous_position():
    model, processor = _tiny()
    t = TokenIds.from_tokenizer(processor.tokenizer)
    a, b = 40, 41  # two ordinary BPE tokens
    S, P, E, EOS = t.latent_start, t.latent_pad, t.latent_end, t.im_end
    ro = _manual_rollout(processor, [a, S, P, P, P, E, b, EOS], K)
    for pairing, shift in (("correct", 1), ("reference", 0)):
        rb = build_replay_batch([ro], processor, K, pairing=pairing)
        p0 = int(rb.batch.attention_mask[0].sum()) - 8  # prompt length
        # Token steps: a, S, b, EOS (not the latent slots, not the forced E).
        assert rb.tok_target.tolist() == [a, S, b, EOS]
        assert rb.tok_col.tolist() == [p0 - 1, p0, p0 + 5, p0 + 6]
        slots = [p0 + 2, p0 + 3, p0 + 4]
        assert rb.lat_col.tolist() == [s - shift for s in slots]
        assert rb.batch.layouts[0].slot_positions == slots
        assert rb.n_steps == 7
    # Cut inside a block: S is a sampled token, the incomplete slots are no steps.
    cut = _manual_rollout(processor, [a, S, P], 0, truncated=True)
    rb = build_replay_batch([cut], processor, K)
    assert rb.tok_target.tolist() == [a, S] and rb.n_latent_steps == 0
    # The trainer's up-front counts agree with the layout.
    assert step_counts(ro, t) == (4, 3) and step_counts(cut, t) == (2, 0)


class _BanAndOpenBlocks(BanTokens):
    """Rollout-only logits processor: bans like BanTokens and makes START likely, so the random
    tiny model opens latent blocks (the replay scores with the plain ban)."""

    def __init__(self, ids, start_id):
        super().__init__(ids)
        self.start_id = start_id

    def __call__(self, logits, position=None):
        logits = super().__call__(logits, position).clone()
        logits[:, self.start_id] += 3.0
        return logits


@pytest.fixture(scope="module")
def rollouts():
    model, processor = _tiny()
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    opener = _BanAndOpenBlocks(ban.ids, TokenIds.from_tokenizer(processor.tokenizer).latent_start)
    out = generate_rollouts(
        model,
        processor,
        make_samples(2, 3),
        group_size=3,
        max_new_tokens=24,
        latent_size=K,
        temperature=0.7,
        top_p=0.99,
        seed=5,
        ban=opener,
    )
    return out, ban, opener


def test_rollouts_are_grouped_seeded_and_keep_their_latent_trace(rollouts):
    out, ban, opener = rollouts
    model, processor = _tiny()
    assert [r.group for r in out] == [0, 0, 0, 1, 1, 1]
    again = generate_rollouts(
        model,
        processor,
        [out[0].sample, out[3].sample],
        group_size=3,
        max_new_tokens=24,
        latent_size=K,
        temperature=0.7,
        top_p=0.99,
        seed=5,
        ban=opener,
    )
    assert all(torch.equal(x.response_ids, y.response_ids) for x, y in zip(out, again))
    assert sum(r.n_blocks for r in out) >= 2
    rb = build_replay_batch(out, processor, K)
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    counts = [step_counts(r, tid) for r in out]
    assert sum(c[0] for c in counts) == rb.n_token_steps
    assert sum(c[1] for c in counts) == rb.n_latent_steps
    banned = set(ban.ids)
    for r in out:
        assert not banned & set(r.response_ids.tolist())
        assert r.latents.shape == (r.n_blocks * K, model.config.text_config.hidden_size)


def _plain_token_logps(model, rb, temperature, ban):
    """Oracle: one ordinary HF forward over inputs_embeds with the rollout latents written into
    the slots (no KV-cache segments), then log_softmax(logits / T)."""
    from monet_fast.model.latent import embed_inputs

    batch = rb.batch
    embeds = embed_inputs(model, batch).clone()
    for row, lay in enumerate(batch.layouts):
        if lay.slot_positions:
            embeds[row, lay.slot_positions] = rb.latents[row].to(embeds.dtype)
    out = model.model.language_model(
        inputs_embeds=embeds,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
    )
    hidden = out.last_hidden_state
    logits = ban(model.lm_head(hidden).float() / temperature)
    logp = torch.log_softmax(logits, -1)
    return logp[rb.tok_row, rb.tok_col, rb.tok_target], hidden


def test_replay_reproduces_the_rollout_policy(rollouts):
    """With unchanged weights: correct pairing gives mu == z (latent logp 0, ratio 1); token
    log-probs equal a plain full-sequence forward; the reference pairing differs."""
    out, ban, _ = rollouts
    model, processor = _tiny()
    rb = build_replay_batch(out, processor, K, pairing="correct")
    with torch.no_grad():
        lp = step_logprobs(model, rb, temperature=0.7, ban=ban)
        want_tok, hidden = _plain_token_logps(model, rb, 0.7, ban)
    torch.testing.assert_close(lp.token_logp, want_tok, rtol=1e-4, atol=1e-4)
    latent_logp = gaussian_logprob(rb.lat_z, lp.mu, 10.0)
    assert latent_logp.abs().max() < 1e-8, latent_logp
    torch.testing.assert_close(lp.mu, hidden[rb.lat_row, rb.lat_col], rtol=1e-4, atol=1e-4)
    ref = build_replay_batch(out, processor, K, pairing="reference")
    with torch.no_grad():
        mu_ref = step_logprobs(model, ref, temperature=0.7, ban=ban).mu
    assert gaussian_logprob(ref.lat_z, mu_ref, 10.0).max() < -1e-3  # same-position: mu != z


def test_latent_forward_return_hidden_is_post_norm_in_batch_coordinates(rollouts):
    """The `return_hidden` option VLPO reads: lm_head(hidden) equals `return_logits`, padding 0."""
    from monet_fast.model.latent import latent_forward

    out, _, _ = rollouts
    model, processor = _tiny()
    rb = build_replay_batch(out, processor, K)
    with torch.no_grad():
        res = latent_forward(
            model, rb.batch, latents=rb.latents, return_hidden=True, return_logits=True
        )
    mask = rb.batch.attention_mask.bool()
    assert res.hidden.shape == (*mask.shape, model.config.text_config.hidden_size)
    assert res.hidden[~mask].abs().sum() == 0
    torch.testing.assert_close(
        model.lm_head(res.hidden)[mask], res.logits[mask], rtol=1e-5, atol=1e-5
    )


def test_prompt_files_and_prompt_preparation(tmp_path):
    import json

    from monet_fast.train.prompts import load_prompts, prepare_prompt
    from monet_fast.train.vlpo_config import RLDataSection

    img = make_samples(1, 0)[0].question_images[0]
    img.save(tmp_path / "a.png")
    rows = [
        {"question": "Which colour?", "image": "a.png", "answer": "B", "choices": ["red", "blue"]},
        {"question": "How many dots?", "image": ["a.png", "a.png"], "answer": "3", "id": "q2"},
        {"question": "no answer"},
    ]
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(Exception, match="row 2"):
        load_prompts(RLDataSection(kind="prompts", path=str(path)))
    samples, report = load_prompts(RLDataSection(kind="prompts", path=str(path), on_error="skip"))
    assert len(samples) == 2 and report.n_skipped == 1
    mc, free = samples
    assert mc.question[-1].text == "Which colour?\nA. red\nB. blue" and mc.choices == [
        "red",
        "blue",
    ]
    assert free.sample_id == "q2" and len(free.question_images) == 2 and free.reasoning == []
    assert R.MonetReward()("so \\boxed{3}", free).reward == pytest.approx(1.0)
    p = prepare_prompt(mc, [4, 4], " Put the answer in \\boxed{}.")
    assert p.question[-1].text.endswith("B. blue Put the answer in \\boxed{}.")
    assert p.question_images[0].size[0] * p.question_images[0].size[1] <= 4 * 28 * 28
    synthetic, _ = load_prompts(RLDataSection(n=3, synthetic={"n_choices": 2}))
    assert [len(s.choices) for s in synthetic] == [2, 2, 2]
