"""latent.feedback_norm (`monet_fast.model.feedback`): the rescale rule, its config fields, and
that the decoder, the batched training forward and the VLPO replay apply the same rule."""

from __future__ import annotations

import functools

import pytest
import torch

from monet_fast.data import make_samples
from monet_fast.model.config import LatentConfig, apply_latent_config, get_latent_config
from monet_fast.model.feedback import FeedbackNorm, embedding_norm, rescale
from monet_fast.model.latent import latent_forward
from monet_fast.model.tokens import TokenIds
from monet_fast.train.rollout import (
    BanTokens,
    build_replay_batch,
    default_ban_ids,
    generate_rollouts,
    step_logprobs,
)

K = 3


def test_rescale_keeps_direction_and_sets_the_norm():
    h = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 2.0]])
    out = rescale(h, torch.tensor(10.0))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([10.0, 0.0, 10.0]))
    torch.testing.assert_close(out[0], torch.tensor([6.0, 8.0, 0.0]))  # same direction
    assert out.dtype == h.dtype
    half = rescale(h.to(torch.bfloat16), torch.tensor(10.0))
    assert half.dtype == torch.bfloat16


def test_embedding_norm_is_the_mean_row_norm():
    emb = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0]]))

    class M:
        def get_input_embeddings(self):
            return emb

    assert float(embedding_norm(M())) == pytest.approx((5 + 1 + 2 + 10) / 4)


def test_bad_feedback_norm_values_are_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"feedback_norm must be one of \['none', 'match_emb"):
        LatentConfig(feedback_norm="l2")
    from monet_fast.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.feedback_norm must be one of .*'l2'"):
        load_config(None, ["stage=1", "model.tiny_seed=0", "model.feedback_norm=l2"])
    cfg = load_config(
        None, ["stage=1", "model.tiny_seed=0", "model.feedback_norm=match_embeddings"]
    )
    assert cfg.model.feedback_norm == "match_embeddings"


@functools.cache
def _tiny(mode: str):
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(0, latent_size=K, initializer_range=0.2)
    apply_latent_config(model, get_latent_config(model).replace(feedback_norm=mode))
    return model.eval(), processor


@functools.cache
def _rollouts(mode: str):
    model, processor = _tiny(mode)
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    start = TokenIds.from_tokenizer(processor.tokenizer).latent_start

    def opener(logits, position=None):  # make the random model open latent blocks
        logits = ban(logits, position).clone()
        logits[:, start] += 3.0
        return logits

    out = generate_rollouts(
        model,
        processor,
        make_samples(2, 3),
        group_size=2,
        max_new_tokens=20,
        latent_size=K,
        temperature=0.7,
        seed=5,
        ban=opener,
    )
    return out, ban


def test_decoder_training_forward_and_replay_apply_the_same_rule():
    """match_embeddings: every fed-back latent has the embedding norm; the batched latent forward
    recomputes the decoder's latents from the same tokens; the replay's mu equals z."""
    model, processor = _tiny("match_embeddings")
    out, ban = _rollouts("match_embeddings")
    target = float(embedding_norm(model))
    latents = torch.cat([r.latents for r in out if r.latents.numel()])
    assert latents.shape[0] >= 2
    torch.testing.assert_close(latents.norm(dim=1), torch.full((latents.shape[0],), target))
    rb = build_replay_batch(out, processor, K, pairing="correct")
    with torch.no_grad():
        # No override: latent_forward feeds back its own (normalised) hidden states.
        res = latent_forward(model, rb.batch)
        lp = step_logprobs(model, rb, temperature=0.7, ban=ban)
    for own, recorded in zip(res.latents, rb.latents):
        torch.testing.assert_close(own, recorded.to(own.dtype), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.mu, rb.lat_z.to(lp.mu.dtype), atol=1e-4, rtol=1e-4)


def test_feedback_norm_changes_the_fed_back_latents_and_the_outputs():
    plain, _ = _rollouts("none")
    normed, _ = _rollouts("match_embeddings")
    model, _ = _tiny("none")
    target = float(embedding_norm(model))
    raw = torch.cat([r.latents for r in plain if r.latents.numel()])
    # The raw hidden-state norm is far from the embedding norm (else this test proves nothing).
    assert (raw.norm(dim=1) - target).abs().min() > 0.1 * target
    assert any(
        not torch.equal(a.response_ids, b.response_ids) or a.n_blocks != b.n_blocks
        for a, b in zip(plain, normed)
    ) or not torch.allclose(raw, torch.cat([r.latents for r in normed if r.latents.numel()]))


def test_python_step_loop_applies_the_rule_too():
    from monet_fast.decode import generate
    from monet_fast.decode.pyloop import generate_python_loop
    from monet_fast.model.sequence import render_prompt

    model, processor = _tiny("match_embeddings")
    start = TokenIds.from_tokenizer(processor.tokenizer).latent_start

    def force(logits, index):
        logits[:, start] += (index == 1).to(logits.dtype) * 1e6
        return logits

    items = [{"text": render_prompt(s), "images": s.question_images} for s in make_samples(2, 4)]
    kw = dict(max_new_tokens=10, logits_processor=force, return_latents=True)
    a = generate(model, processor, items, **kw)
    b = generate_python_loop(model, processor, items, **kw)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    for x, y in zip(a.latents, b.latents):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert FeedbackNorm.for_model(model).active


def _graph_path_matches_eager(model, processor) -> None:
    from monet_fast.decode import LatentDecoder
    from monet_fast.model.sequence import render_prompt

    start = TokenIds.from_tokenizer(processor.tokenizer).latent_start

    def force(logits, index):  # graph-safe: tensor ops only
        logits[:, start] += (index == 1).to(logits.dtype) * 1e6
        return logits

    items = [{"text": render_prompt(s), "images": s.question_images} for s in make_samples(2, 4)]
    kw = dict(max_new_tokens=10, logits_processor=force, return_latents=True)
    decoder = LatentDecoder(model, processor, emulate_graphs=model.device.type == "cpu")
    graphed = decoder.generate(items, **kw)
    target = decoder._feedback.target
    again = decoder.generate(items, **kw)  # the graph is replayed with the refreshed target
    assert decoder._feedback.target is target  # same tensor: captured graphs read it
    eager = decoder.generate(items, use_cuda_graphs=False, **kw)
    for out in (again, eager):
        assert [s.tolist() for s in out.sequences] == [s.tolist() for s in graphed.sequences]
        for x, y in zip(out.latents, graphed.latents):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    lat = torch.cat(
        [x[i, :n] for x, c in zip(graphed.latents, graphed.latent_counts) for i, n in enumerate(c)]
    )
    assert lat.shape[0] >= 2
    torch.testing.assert_close(
        lat.float().norm(dim=1), torch.full((lat.shape[0],), float(target)), atol=1e-3, rtol=1e-4
    )


def test_graph_path_applies_the_rule_emulated_on_cpu():
    _graph_path_matches_eager(*_tiny("match_embeddings"))


@pytest.mark.gpu
def test_graph_path_applies_the_rule_on_cuda():
    import copy

    model, processor = _tiny("match_embeddings")
    _graph_path_matches_eager(copy.deepcopy(model).cuda(), processor)


def test_feedback_norm_survives_save_and_load(tmp_path):
    from monet_fast.model.loading import load_pretrained, save_pretrained

    model, processor = _tiny("match_embeddings")
    save_pretrained(model, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert get_latent_config(loaded).feedback_norm == "match_embeddings"
    assert FeedbackNorm.for_model(loaded).active


@pytest.mark.slow
def test_target_norm_is_read_from_the_whole_table_under_zero3(tmp_path):
    """ZeRO-3 partitions the embedding table (an empty local tensor outside its forward): the
    target must be the gathered table's mean row norm, as under ZeRO-2, not 0 (which would zero
    every fed-back latent of a stage-2/3 run)."""
    from pathlib import Path

    from monet_fast.train.sft import RECIPES, build_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    norms = {}
    for zero in (2, 3):
        cfg = build_config(
            2,
            tiny / "stage2.yaml",
            [
                "data.n=4",
                "model.latent_size=4",
                "logging.progress=false",
                "trainer.micro_batch_size=2",
                "trainer.grad_accum=2",
                "trainer.export=false",
                "teacher.mode=online",
                f"deepspeed.zero_stage={zero}",
                "model.feedback_norm=match_embeddings",
            ],
            output=tmp_path / f"zero{zero}",
            max_steps=1,
        )
        recipe = RECIPES[2](cfg)
        try:
            recipe.setup()
            module = getattr(recipe.model, "module", recipe.model)
            norms[zero] = float(FeedbackNorm.for_model(module).target)
        finally:
            recipe.cleanup()
    assert norms[2] > 0
    assert norms[3] == pytest.approx(norms[2], rel=1e-6)
