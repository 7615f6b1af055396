"""VLPO replay of `monet_vllm` rollouts (the released Monet-7B's vLLM layout: START's own row is
the first latent row, blocks of 1..K rows; `monet_fast.train.replay_vllm`).

The oracle is a per-step recompute without KV cache: for every generated position, one forward
over the rows before it (prompt embeddings, token embeddings, the rollout latents written into
the overwritten rows), then log_softmax(logits / T). A steering logits processor makes the random
tiny model open blocks that end every way the runner allows (forced END after K rows, sampled
END, EOS inside a block, cut by max_new_tokens, cut right after START)."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from monet_fast.data import make_samples
from monet_fast.model.latent import embed_inputs, latent_forward
from monet_fast.model.sequence import rope_position_ids
from monet_fast.model.tokens import TokenIds
from monet_fast.train.replay_vllm import parse_blocks, step_indices
from monet_fast.train.rollout import (
    build_replay_batch,
    generate_rollouts,
    prompt_input,
    step_counts,
    step_logprobs,
)

K = 3
T = 0.7
MAX_NEW = 14


@functools.cache
def _tiny():
    from monet_fast.model.tiny import tiny_model

    # A wide init range so the random model's outputs depend on its inputs (as test_decode).
    model, processor = tiny_model(
        0, latent_size=K, latent_layout="monet_vllm", initializer_range=0.2
    )
    return model.eval(), processor


def _ids():
    model, processor = _tiny()
    t = TokenIds.from_tokenizer(processor.tokenizer)
    return t, int(model.generation_config.eos_token_id)


class Steer:
    """Rollout-only logits processor: forces given ids at given output indices of each row and
    keeps START / END / PAD / EOS unsampleable elsewhere (so every block is planned)."""

    def __init__(self, plans: list[dict[int, int]], banned: list[int]):
        self.plans, self.banned = plans, banned

    def __call__(self, logits, position):
        logits = logits.clone()
        for b in range(logits.shape[0]):
            want = self.plans[b].get(int(position[b]))
            if want is None:
                logits[b, self.banned] = float("-inf")
            else:
                logits[b] = float("-inf")
                logits[b, want] = 0.0
        return logits


@functools.cache
def _rollouts():
    model, processor = _tiny()
    t, eos = _ids()
    S, E = t.latent_start, t.latent_end
    plans = [
        # forced END (3 rows), sampled END (1 row), sampled END (2 rows), cut right after START
        {1: S, 5: S, 6: E, 8: S, 10: E, 13: S},
        {2: S, 4: eos},  # EOS sampled at a latent row
        {11: S},  # K rows, then the budget ends before the forced END
        {9: S},  # K rows, forced END, then text
    ]
    steer = Steer(plans, [S, E, t.latent_pad, eos])
    return generate_rollouts(
        model,
        processor,
        make_samples(4, 0),
        group_size=1,
        max_new_tokens=MAX_NEW,
        latent_size=K,
        temperature=T,
        seed=3,
        batch_size=4,
        ban=steer,
        latent_layout="monet_vllm",
    )


def _oracle(model, processor, rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n_resp, V] of each generated position i, post-norm hidden state [n_resp, H] of
    the row before position i) by a full forward over the prefix at every step, no cache."""
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    inp = prompt_input(rollout.sample)
    enc = processor(text=[inp["text"]], images=inp["images"] or None, return_tensors="pt")
    rows = [embed_inputs(model, dict(enc))[0]]
    pos = rope_position_ids(
        enc["input_ids"], enc["mm_token_type_ids"], enc.get("image_grid_thw"), None, 2
    )[:, 0]
    ids = rollout.response_ids.tolist()
    latent_rows = [r for b in rollout.vllm_blocks for r in range(b.start, b.start + b.n)]
    z = dict(zip(latent_rows, rollout.latents))
    nxt = int(pos.max()) + 1
    for i, tok in enumerate(ids):
        rows.append((z[i] if i in z else embed.weight[tok]).view(1, -1))
    x = torch.cat(rows)
    pos = torch.cat([pos, torch.arange(nxt, nxt + len(ids)).expand(3, -1)], dim=1)
    p0 = x.shape[0] - len(ids)
    logps, hidden = [], []
    for t in range(p0, p0 + len(ids)):  # rows before generated position t
        h = lm(
            inputs_embeds=x[None, :t], position_ids=pos[:, None, :t], use_cache=False
        ).last_hidden_state[0, -1]
        logps.append(torch.log_softmax(model.lm_head(h).float() / T, -1))
        hidden.append(h)
    return torch.stack(logps), torch.stack(hidden)


# ----------------------------------------------------------------------------- block parsing


def test_blocks_and_steps_of_a_hand_made_response():
    t, eos = _ids()
    a, b, c = 40, 41, 42
    S, P, E = t.latent_start, t.latent_pad, t.latent_end
    resp = [a, S, P, P, E, b, S, E, c, S, P, eos]
    blocks = parse_blocks(resp, [3, 1, 2], t, K)
    assert [(x.start, x.n, x.end) for x in blocks] == [
        (1, 3, "forced_end"),
        (6, 1, "sampled_end"),
        (9, 2, "eos"),
    ]
    tok, lat = step_indices(blocks, len(resp))
    # Placeholders (2, 3, 10) and the forced END (4) are no token steps; START, the sampled END
    # (7) and the EOS are. Every overwritten row, START's included, is a latent step.
    assert tok == [0, 1, 5, 6, 7, 8, 9, 11]
    assert lat == [1, 2, 3, 6, 9, 10]
    # Cut by max_new_tokens inside a block / right after START: all emitted rows are latents.
    cut = parse_blocks([a, S, P], [2], t, K)
    assert [(x.n, x.end) for x in cut] == [(2, "cut")]
    assert step_indices(cut, 3) == ([0, 1], [1, 2])
    assert step_indices(parse_blocks([a, S], [1], t, K), 2) == ([0, 1], [1])
    # A START after the block cap is text: blocks are the first len(counts) STARTs.
    assert step_indices(parse_blocks([S, E, S, a], [1], t, K), 4)[1] == [0]


@pytest.mark.parametrize(
    "resp, counts, match",
    [
        ([40, "S", "P", "E"], [1], "followed by id"),  # a PAD the trace has no latent for
        ([40, "S", "E"], [2], "rows after START"),  # more latents than rows
        ([40, "S", "P", "P", "P", "E"], [4], r"allowed 1..latent_size=3"),
        ([40, "S", "P", "E"], [2, 1], "only 1 <abs_vis_token>"),
        ([40, "S", "P", "P", 41], [3], "followed by id 41"),  # K rows must end in END
    ],
)
def test_inconsistent_blocks_are_refused_clearly(resp, counts, match):
    t, _ = _ids()
    sym = {"S": t.latent_start, "P": t.latent_pad, "E": t.latent_end}
    with pytest.raises(ValueError, match=match):
        parse_blocks([sym.get(x, x) for x in resp], counts, t, K)


# -------------------------------------------------------------------------------- the oracle


def test_rollouts_cover_every_way_a_block_ends():
    rollouts = _rollouts()
    kinds = [[(b.n, b.end) for b in r.vllm_blocks] for r in rollouts]
    assert kinds == [
        [(3, "forced_end"), (1, "sampled_end"), (2, "sampled_end"), (1, "cut")],
        [(2, "eos")],
        [(3, "cut")],
        [(3, "forced_end")],
    ]
    assert [r.finish_reason for r in rollouts] == ["length", "eos", "length", "length"]
    assert [r.truncated_block for r in rollouts] == [True, False, True, False]
    assert [r.n_blocks for r in rollouts] == [3, 0, 0, 1]
    hidden = _tiny()[0].config.text_config.hidden_size
    assert [tuple(r.latents.shape) for r in rollouts] == [(7, hidden), (2, hidden), (3, hidden)] + [
        (3, hidden)
    ]


def test_replay_equals_a_no_cache_per_step_recompute():
    model, processor = _tiny()
    rollouts = _rollouts()
    rb = build_replay_batch(rollouts, processor, K, pairing="correct")
    with torch.no_grad():
        res = latent_forward(model, rb.batch, latents=rb.latents, return_hidden=True)
        replay_logp = torch.log_softmax(model.lm_head(res.hidden).float() / T, -1)
        lp = step_logprobs(model, rb, temperature=T)
        oracle = [_oracle(model, processor, r) for r in rollouts]
    p_len = rb.batch.attention_mask.sum(1) - torch.tensor(
        [r.response_ids.numel() for r in rollouts]
    )
    want_tok, want_mu = [], []
    for b, (r, (logp, hidden)) in enumerate(zip(rollouts, oracle)):
        p0, n = int(p_len[b]), r.response_ids.numel()
        # Every generated position, full distribution: fp32 with segments + cache vs full
        # recomputes differ only in summation order.
        torch.testing.assert_close(replay_logp[b, p0 - 1 : p0 + n - 1], logp, atol=1e-4, rtol=1e-4)
        tok, lat = step_indices(r.vllm_blocks, n)
        ids = r.response_ids
        want_tok.append(logp[tok, ids[tok]])
        # The engine's latent z_i is the state of the row before row s + i: the recompute's.
        # (hidden[i] is the state of the row before response position i.)
        torch.testing.assert_close(r.latents, hidden[lat], atol=1e-4, rtol=1e-4)
        want_mu.append(hidden[lat])
    torch.testing.assert_close(lp.token_logp, torch.cat(want_tok), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.mu, torch.cat(want_mu), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.mu, rb.lat_z, atol=1e-4, rtol=1e-4)  # correct pairing: mu == z
    # The trainer's up-front counts agree with the replay.
    t, _ = _ids()
    counts = [step_counts(r, t) for r in rollouts]
    assert sum(c[0] for c in counts) == rb.n_token_steps
    assert sum(c[1] for c in counts) == rb.n_latent_steps == 15
    # Reference pairing: the mean is read at the latent's own row (differs from z).
    ref = build_replay_batch(rollouts, processor, K, pairing="reference")
    assert torch.equal(ref.lat_col, rb.lat_col + 1)


def test_sft_batch_checks_still_refuse_short_blocks():
    """latent_forward accepts blocks shorter than K only for the monet_vllm layout."""
    model, processor = _tiny()
    rb = build_replay_batch(_rollouts()[:2], processor, K)
    batch = dataclasses.replace(rb.batch, latent_layout="sft")
    with pytest.raises(ValueError, match="expected latent_size=3"):
        latent_forward(model, batch, latents=rb.latents, return_hidden=True)
    with pytest.raises(ValueError, match="latent_layout must be one of"):
        latent_forward(
            model, dataclasses.replace(rb.batch, latent_layout="vllm"), latents=rb.latents
        )


# ----------------------------------------------------------------------------- VLPO update


def test_vlpo_updates_run_on_monet_vllm_rollouts():
    """Two updates on one monet_vllm rollout batch: the first is on-policy (ratio 1, latent
    logp 0), the second sees moved latent means (ratio != 1) and its latent term has a gradient."""
    from monet_fast.train.vlpo_config import ObjectiveSection
    from monet_fast.train.vlpo_module import VLPOTrainModule, score_steps

    base, processor = _tiny()
    model = copy.deepcopy(base).train()
    rollouts = copy.deepcopy(_rollouts())
    for i, r in enumerate(rollouts):
        r.advantage = 1.0 if i % 2 == 0 else -1.0
    rb = build_replay_batch(rollouts, processor, K)
    module = VLPOTrainModule(model, ObjectiveSection(kl_coef=0.0), T, None)
    old = score_steps(model, rb, temperature=T, sigma=10.0, ban=None)
    assert old.latent.abs().max() < 1e-8 and old.latent.numel() == rb.n_latent_steps
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    out = module(rb, old)
    tok, lat = out["terms"]
    assert lat.kind == "latent" and lat.ratio.numel() == rb.n_latent_steps
    torch.testing.assert_close(lat.ratio, torch.ones_like(lat.ratio))
    out["objective"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    opt.step()
    opt.zero_grad()

    # Second update on the same rollouts: the latent term alone has a non-zero gradient.
    out = module(rb, old)
    lat = out["terms"][1]
    assert (lat.ratio - 1).abs().max() > 1e-6
    lat.loss.sum().backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


def test_rl_config_key_names_the_allowed_layouts():
    from pathlib import Path

    from monet_fast.train.config import ConfigError
    from monet_fast.train.vlpo_config import load_rl_config

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "vlpo.yaml"
    assert load_rl_config(config).rollout.latent_layout == "sft"
    with pytest.raises(ConfigError, match=r"rollout.latent_layout must be one of \['sft', 'mo"):
        load_rl_config(config, ["rollout.latent_layout=vllm"])


class _OpenBlocks:
    """Rollout-only processor for the recipe test: the recipe's ban plus a START bonus, so the
    random tiny model opens monet_vllm blocks (the replay scores with the plain ban)."""

    def __init__(self, ban, start_id: int):
        self.ban, self.start_id = ban, start_id

    def __call__(self, logits, position=None):
        logits = self.ban(logits, position).clone()
        logits[:, self.start_id] += 4.0
        return logits


@pytest.mark.slow
def test_the_recipe_trains_on_monet_vllm_rollouts(tmp_path, monkeypatch):
    """`rollout.latent_layout: monet_vllm` end to end: rollouts in that layout, replayed and
    updated twice per rollout batch; the exported model decodes in that layout."""
    from pathlib import Path

    from monet_fast.model.config import get_latent_config
    from monet_fast.model.loading import load_pretrained
    from monet_fast.train import vlpo
    from monet_fast.train.metrics import read_metrics
    from monet_fast.train.rl_cli import rl

    real, seen = vlpo.generate_rollouts, []

    def opening(*args, ban=None, **kwargs):
        start = TokenIds.from_tokenizer(args[1].tokenizer).latent_start
        out = real(*args, ban=_OpenBlocks(ban, start), **kwargs)
        seen.extend(out)
        return out

    monkeypatch.setattr(vlpo, "generate_rollouts", opening)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "vlpo.yaml"
    overrides = [
        "logging.progress=false",
        "model.latent_size=3",
        "data.n=4",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=16",
        "rollout.latent_layout=monet_vllm",
        "trainer.mini_batch_prompts=1",
        "trainer.micro_batch_size=4",
        "filter.enabled=false",
        "ref.mode=none",
        "vlpo.kl_coef=0",
    ]
    result = rl(config, overrides, output=tmp_path / "run", max_steps=1)
    (m,) = read_metrics(tmp_path / "run")
    assert m["skipped"] == 0 and m["updates"] == 2 and result.global_step == 1
    assert seen and all(r.latent_layout == "monet_vllm" for r in seen)
    assert any(r.vllm_blocks for r in seen)
    assert m["latent_steps"] == sum(r.latents.shape[0] for r in seen) > 0
    model, _ = load_pretrained(result.export)
    assert get_latent_config(model).latent_layout == "monet_vllm"
