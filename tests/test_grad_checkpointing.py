"""Cache-safe gradient checkpointing of the segment-wise latent forward (stages 2/3, VLPO replay):
gradients equal the non-checkpointed run, and the KV cache is not appended twice."""

import pytest
import torch

from monet_fast._compat import enable_activation_checkpointing
from monet_fast.data import collate
from monet_fast.model import latent_forward
from monet_fast.model.tiny import tiny_model
from tests.test_latent_forward import K, _teacher, make_sample


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model(seed=0)
    return model.float().train(), processor


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, batch, teacher, checkpoint):
    model.zero_grad()
    out = latent_forward(model, batch, teacher=teacher, checkpoint=checkpoint)
    out.loss.backward()
    return out, _grads(model)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_checkpointed_gradients_equal_plain(tiny, stage):
    model, processor = tiny
    samples = [make_sample(0, 1), make_sample(1, 2, words=4)]
    batch = collate(samples, processor, stage, latent_size=K)
    with torch.no_grad():
        states = latent_forward(model, batch, return_states=True)
    teacher = _teacher(states.obs_states if stage == "stage2" else states.slot_states)

    plain, g_plain = _run(model, batch, teacher, checkpoint=False)
    calls = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        ckpt, g_ckpt = _run(model, batch, teacher, checkpoint=True)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(ckpt.loss, plain.loss, atol=0, rtol=0)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 0
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # The layers did run through our wrapper (hooks fire on `layer(...)`, once per segment).
    n_segments = sum(1 for _ in calls) // len(model.model.language_model.layers)
    assert n_segments > 3


def test_model_flag_turns_it_on_and_cache_is_not_appended_twice(tiny):
    """enable_activation_checkpointing (the stage-1 switch) now makes latent_forward checkpoint
    cache-safely instead of transformers dropping the cache; backward recomputes the layers."""
    model, processor = tiny
    batch = collate([make_sample(2, 1)], processor, "stage3", latent_size=K)
    lm = model.model.language_model
    cls = type(lm.layers[0])
    orig = cls.forward
    forwards = []

    def spy(self, *a, **kw):
        if self.self_attn.layer_idx == 0:
            forwards.append(1)
        return orig(self, *a, **kw)

    cls.forward = spy
    try:
        plain, g_plain = _run(model, batch, None, checkpoint=None)
        n_plain = len(forwards)
        enable_activation_checkpointing(model, use_reentrant=False)
        # checkpoint=False with the model's flag on: no checkpointing, and the cache is kept.
        off, _ = _run(model, batch, None, checkpoint=False)
        torch.testing.assert_close(off.loss, plain.loss, atol=0, rtol=0)
        forwards.clear()
        ckpt, g_ckpt = _run(model, batch, None, checkpoint=None)
    finally:
        cls.forward = orig
        model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in lm.layers)
    torch.testing.assert_close(ckpt.loss, plain.loss, atol=0, rtol=0)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # Every segment's layer-0 call was recomputed once in backward.
    assert len(forwards) == 2 * n_plain and n_plain > K


def test_eval_and_no_grad_are_untouched(tiny):
    model, processor = tiny
    batch = collate([make_sample(0, 1)], processor, "stage2", latent_size=K)
    with torch.no_grad():
        a = latent_forward(model, batch, checkpoint=False).loss
        b = latent_forward(model, batch, checkpoint=True).loss
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert "forward" not in vars(model.model.language_model.layers[0])


def _vlpo_update_grads(ce_chunk_size: int = 0, checkpoint: bool = False):
    """Gradients of one VLPO micro-batch objective on hand-made rollouts (tiny model)."""
    from monet_fast.model.tokens import TokenIds
    from monet_fast.train.rollout import BanTokens, build_replay_batch, default_ban_ids
    from monet_fast.train.vlpo_config import ObjectiveSection
    from monet_fast.train.vlpo_module import VLPOTrainModule
    from tests.test_vlpo import K as VK
    from tests.test_vlpo import _manual_rollout, _tiny

    model, processor = _tiny()
    t = TokenIds.from_tokenizer(processor.tokenizer)
    S, P, E, EOS = t.latent_start, t.latent_pad, t.latent_end, t.im_end
    torch.manual_seed(0)
    ros = [
        _manual_rollout(processor, [40, S, *[P] * VK, E, 41, EOS], VK),
        _manual_rollout(processor, [42, 43, S, *[P] * VK, E, 44, S, *[P] * VK, E, EOS], 2 * VK),
        _manual_rollout(processor, [45, 46, 47, EOS], 0),
    ]
    for r, adv in zip(ros, (1.0, -0.5, 0.25)):
        r.advantage = adv
    rb = build_replay_batch(ros, processor, VK)
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    module = VLPOTrainModule(
        model, ObjectiveSection(kl_coef=0.0, ce_chunk_size=ce_chunk_size), 0.7, ban
    )
    model.train()
    if checkpoint:
        enable_activation_checkpointing(model, use_reentrant=False)
    try:
        model.zero_grad()
        out = module(rb, None, None, scale=1.0 / rb.n_steps)
        out["objective"].backward()
        return out["objective"].detach(), _grads(model)
    finally:
        if checkpoint:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()


@pytest.mark.slow  # ~8 s on 2 busy cores: two VLPO updates with and without checkpointing
def test_vlpo_update_checkpointed_equals_plain():
    obj, g_plain = _vlpo_update_grads(checkpoint=False)
    obj_ckpt, g_ckpt = _vlpo_update_grads(checkpoint=True)
    torch.testing.assert_close(obj_ckpt, obj, atol=0, rtol=0)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_stage_with_gradient_checkpointing_gives_the_same_losses(tmp_path, stage):
    """`model.gradient_checkpointing: true` through the SFT recipe (stages 2/3, previously
    refused): the same losses over two steps (the second step sees the first's update)."""
    from tests.test_train_sft import _run

    _, plain = _run(tmp_path, stage, "optim.lr=1e-3", name="plain", max_steps=2)
    _, ckpt = _run(
        tmp_path,
        stage,
        "optim.lr=1e-3",
        "model.gradient_checkpointing=true",
        name="gc",
        max_steps=2,
    )
    for key in ("loss", "align_loss"):
        torch.testing.assert_close(
            torch.tensor([m[key] for m in ckpt]),
            torch.tensor([m[key] for m in plain]),
            rtol=1e-5,
            atol=1e-6,
        )
