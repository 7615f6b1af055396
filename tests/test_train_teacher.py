"""Teacher targets: layer-subset alignment in latent_forward, the safetensors teacher cache
(exactness vs online, dtype, layer subsets, resumable precompute, verification errors)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from monet_fast.data import collate, make_samples
from monet_fast.model import latent_forward
from monet_fast.model.losses import alignment_per_sample
from monet_fast.model.tiny import tiny_model
from monet_fast.stage import Stage
from monet_fast.train import teacher as T

K = 4


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model(seed=0, latent_size=K)
    return model.float().eval(), processor


@pytest.fixture(scope="module")
def samples():
    return make_samples(5, seed=0)


def _header(model, stage: int, layers=None, dtype="float32") -> T.CacheHeader:
    tc = model.config.text_config
    return T.CacheHeader(
        student_stage=stage,
        kind=T.TARGET_KIND[stage],
        teacher=T.model_identity(model, None),
        layers=layers,
        n_states=tc.num_hidden_layers + 1,
        hidden_size=tc.hidden_size,
        dtype=dtype,
        latent_size=K,
    )


def _build(tmp_path, model, processor, samples, stage, **kw):
    header = _header(model, stage, kw.pop("layers", None), kw.pop("dtype", "float32"))
    T.open_or_create_header(tmp_path, header)
    report = T.precompute_teacher_cache(
        model, processor, samples, tmp_path, header, batch_size=2, shard_size=2, **kw
    )
    T.finalize_cache(tmp_path, samples, 2)
    return header, report


def test_teacher_layers_aligns_only_those_layers(tiny, samples):
    model, processor = tiny
    batch = collate(samples[:2], processor, "stage2", K)
    full = latent_forward(model, batch, return_states=True).obs_states
    layers = [0, 2]
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(s[layers].shape, generator=g) for s in full]
    out = latent_forward(model, batch, teacher=teacher, teacher_layers=layers)
    want = sum(alignment_per_sample(t, s[layers]) for t, s in zip(teacher, full)) / 2
    torch.testing.assert_close(out.align_loss, want)
    with pytest.raises(ValueError, match="layers"):  # a subset teacher without the option
        latent_forward(model, batch, teacher=teacher)


@pytest.mark.parametrize("stage", [2, 3])
def test_fp32_cache_equals_online_targets(tmp_path, tiny, samples, stage):
    model, processor = tiny
    _, report = _build(tmp_path, model, processor, samples, stage)
    assert (report.shards_total, report.shards_computed) == (3, 3)
    cache = T.TeacherCache(tmp_path, expect=_header(model, stage))
    online = T.OnlineTeacher(model, processor, Stage.of(stage), K)
    for i in range(0, 4, 2):  # the precompute's batches (batch_size=2): bit-identical
        for got, want in zip(cache(samples[i : i + 2]), online(samples[i : i + 2])):
            assert torch.equal(got, want)
    n_states = model.config.text_config.num_hidden_layers + 1
    shape = cache.get(samples[0]).shape
    assert shape[0] == n_states and shape[2] == model.config.text_config.hidden_size
    if stage == 3:
        assert shape[1] == K  # one aux image -> K latent slots
    assert cache.bytes_per_sample > 0 and cache.total_bytes == report.total_bytes


def test_bf16_cache_and_layer_subset(tmp_path, tiny, samples):
    model, processor = tiny
    _build(tmp_path, model, processor, samples, 2, layers=[0, 2], dtype="bfloat16")
    cache = T.TeacherCache(tmp_path)
    assert cache.header.layers == [0, 2]
    want = T.compute_teacher_states(model, processor, samples[:2], Stage.STAGE2, K)
    for got, full in zip(cache(samples[:2]), want):
        assert got.dtype == torch.bfloat16 and got.shape[0] == 2
        # bf16 keeps 8 mantissa bits: relative error ~2^-9 per element.
        torch.testing.assert_close(got.float(), full[[0, 2]], rtol=1e-2, atol=1e-2)


def test_precompute_is_resumable(tmp_path, tiny, samples):
    model, processor = tiny
    header, _ = _build(tmp_path, model, processor, samples, 2)
    again = T.precompute_teacher_cache(
        model, processor, samples, tmp_path, header, batch_size=2, shard_size=2
    )
    assert (again.shards_computed, again.shards_reused) == (0, 3)
    (tmp_path / "shard-00001.safetensors").unlink()
    (tmp_path / "shard-00002.safetensors").write_bytes(b"truncated")
    again = T.precompute_teacher_cache(
        model, processor, samples, tmp_path, header, batch_size=2, shard_size=2
    )
    assert (again.shards_computed, again.shards_reused) == (2, 1)
    # rank-sharded: rank 1 of 2 owns shard 1 only
    part = T.precompute_teacher_cache(
        model, processor, samples, tmp_path, header, shard_size=2, rank=1, world_size=2
    )
    assert part.shards_reused == 1 and part.shards_computed == 0


def test_cache_refuses_wrong_samples_and_settings(tmp_path, tiny, samples):
    model, processor = tiny
    header, _ = _build(tmp_path, model, processor, samples[:2], 2)
    cache = T.TeacherCache(tmp_path)
    with pytest.raises(T.MissingTeacherEntry, match="no entry in the teacher cache"):
        cache.get(samples[3])
    changed = dataclasses.replace(samples[0], system="You are terse.")  # same key, new content
    assert cache.missing([changed, samples[1], samples[3]]) == [changed.key, samples[3].key]
    with pytest.raises(ValueError, match="different sample"):
        cache.get(changed)
    other = dataclasses.replace(header, layers=[0])
    with pytest.raises(ValueError, match="built differently.*layers"):
        T.TeacherCache(tmp_path, expect=other)
    with pytest.raises(ValueError, match="built differently"):
        T.open_or_create_header(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="no finished teacher cache"):
        T.TeacherCache(tmp_path / "nowhere")
    # DataLoader workers get a pickled copy: open file handles must not travel.
    cache.get(samples[0])
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.get(samples[0]), cache.get(samples[0]))


def test_resolve_layers():
    assert T.resolve_layers("all", 29) is None
    assert T.resolve_layers([28, 0, -1, 14], 29) == [0, 14, 28]
    assert T.resolve_layers(list(range(3)), 3) is None
    with pytest.raises(ValueError, match="out of range.*29 hidden states"):
        T.resolve_layers([29], 29)
