"""The one `Stage` enum (SFT numbers and layout names parse to it) and the typed `LatentBatch`."""

from __future__ import annotations

import json

import pytest
import torch

from monet_fast.data import collate, make_samples
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.model.sequence import STAGES
from monet_fast.model.tiny import tiny_processor
from monet_fast.stage import SFT_STAGE_NUMBERS, Stage


@pytest.mark.parametrize("value", [2, "2", "stage2", " stage2 ", Stage.STAGE2])
def test_every_spelling_of_a_stage_parses_to_the_same_member(value):
    stage = Stage.of(value)
    assert stage is Stage.STAGE2
    # It is the layout name wherever a string is expected.
    assert stage == "stage2" and f"{stage}" == "stage2" and str(stage) == "stage2"
    assert json.dumps({"stage": stage}) == '{"stage": "stage2"}'
    assert {"stage2": 1}[stage] == 1


@pytest.mark.parametrize("value", [0, 4, "stage4", "two", True, None])
def test_a_bad_stage_is_refused_naming_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"stage must be one of 'stage1', 'stage2'.*got"):
        Stage.of(value)


def test_numbers_and_teachers():
    assert [s.number for s in Stage] == [1, 2, 3, None]
    assert SFT_STAGE_NUMBERS == (1, 2, 3)
    assert STAGES == ("stage1", "stage2", "stage3", "infer")
    # stage 2 aligns to stage-1 observation states, stage 3 to stage-2 latents.
    assert [s.teacher for s in Stage] == [None, Stage.STAGE1, Stage.STAGE2, None]


@pytest.fixture(scope="module")
def batch() -> LatentBatch:
    return collate(make_samples(2, seed=3), tiny_processor(), "stage2", latent_size=2)


def test_collate_returns_a_typed_batch(batch):
    assert isinstance(batch, LatentBatch)
    assert batch.stage is Stage.STAGE2 and batch.latent_layout == "sft"
    assert batch.batch_size == 2 == len(batch.layouts) == len(batch.keys)
    assert set(batch.model_inputs()) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    }


def test_dict_style_access_says_how_to_read_the_field(batch):
    with pytest.raises(TypeError, match=r"use batch\.input_ids, not batch\['input_ids'\]"):
        batch["input_ids"]


def test_to_moves_every_tensor_and_keeps_the_rest(batch):
    moved = batch.to("meta")
    tensors = [
        name
        for name, value in vars(batch).items()
        if isinstance(value, torch.Tensor) and value is not None
    ]
    # stage 2 with images: every optional tensor is present, so all 10 must move.
    assert len(tensors) == 10
    for name in tensors:
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == "meta", name
        assert after.dtype == before.dtype and after.shape == before.shape, name
        assert before.device.type == "cpu", name  # the original is untouched
    assert moved.layouts is batch.layouts and moved.keys == batch.keys
    assert moved.stage is batch.stage and moved.latent_size == batch.latent_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pin_memory_pins_every_tensor(batch):
    pinned = batch.pin_memory()
    for name, value in vars(pinned).items():
        if isinstance(value, torch.Tensor):
            assert value.is_pinned(), name


def test_collator_and_teacher_take_a_stage_not_a_number():
    # Numbers are parsed at the config / CLI boundary (TrainConfig.student_stage); inside, a
    # bare 2 would silently mean whatever each callee guessed.
    from monet_fast.train import teacher as T
    from monet_fast.train.data import SFTCollator

    processor = tiny_processor()
    with pytest.raises(TypeError, match=r"SFTCollator\(student_stage\) takes a Stage.*got 2"):
        SFTCollator(processor, 2, 4, 1.0)
    assert SFTCollator(processor, Stage.STAGE2, 4, 1.0).student_stage is Stage.STAGE2
    with pytest.raises(TypeError, match=r"compute_teacher_states.*got 'stage2'"):
        T.compute_teacher_states(None, processor, [], "stage2", 4)
    with pytest.raises(TypeError, match=r"OnlineTeacher\(student_stage\).*got 3"):
        T.OnlineTeacher(torch.nn.Linear(1, 1), processor, 3, 4)
    header = T.CacheHeader(2, "observation_states", "t", None, 3, 8, "float32", 4)
    assert header.stage is Stage.STAGE2  # the cache file stores the number
