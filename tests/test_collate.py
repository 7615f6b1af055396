"""collate() on the synthetic task with the tiny processor: keys, labels, slots, positions."""

import pytest
import torch

from monet_fast.data import collate, make_samples
from monet_fast.model import tiny_model
from monet_fast.model.tokens import TokenIds


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "infer"])
def test_collate_outputs(tiny, stage):
    model, processor = tiny
    samples = make_samples(3, seed=0)
    batch = collate(samples, processor, stage, latent_size=4)
    for key in (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "labels",
        "latent_slot_mask",
    ):
        assert getattr(batch, key) is not None
    ids = TokenIds.from_tokenizer(processor.tokenizer)
    n_aux = [len(s.aux_images) for s in samples]
    slots = batch.latent_slot_mask.sum(1).tolist()
    assert slots == ([0] * 3 if stage == "stage1" else [4 * n for n in n_aux])
    assert (batch.input_ids[batch.latent_slot_mask] == ids.latent_pad).all()
    # images: question images always, aux images only in stages 1 and 2
    n_images = batch.image_grid_thw.shape[0]
    assert n_images == 3 + (sum(n_aux) if stage in ("stage1", "stage2") else 0)
    labels = batch.labels
    assert (labels[batch.latent_slot_mask] == -100).all()
    assert (labels[batch.input_ids == ids.image_pad] == -100).all()
    assert batch.observation_mask.any(1).all()
    assert (labels[batch.observation_mask] != -100).all()
    assert (batch.masked_rows is not None) == (stage == "stage2")
    # the answer letter is a target
    text = processor.tokenizer.decode(labels[0][labels[0] != -100])
    assert "\\boxed{" + samples[0].answer + "}" in text


@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_equal_get_rope_index(tiny, side):
    model, processor = tiny
    samples = make_samples(3, seed=1)
    samples[1].question[1].text += " please answer carefully"  # different lengths -> padding
    batch = collate(samples, processor, "stage2", latent_size=3, padding_side=side)
    ref, _ = model.model.get_rope_index(
        batch.input_ids,
        batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask,
    )
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], ref[:, valid])
    assert (batch.attention_mask[:, 0 if side == "left" else -1] == 0).any()


def test_tiny_forward_with_collated_positions(tiny):
    model, processor = tiny
    batch = collate(make_samples(2, seed=2), processor, "stage1")
    with torch.no_grad():
        a = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=batch.mm_token_type_ids,
        ).logits
        b = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            position_ids=batch.position_ids,
        ).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_collate_errors(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], processor, "stage1")
    with pytest.raises(ValueError, match="stage must be one of"):
        collate(make_samples(1), processor, "stage9")
    with pytest.raises(ValueError, match="padding_side"):
        collate(make_samples(1), processor, "stage1", padding_side="middle")


def test_observation_tags_can_carry_labels(tiny):
    _, processor = tiny
    ids = TokenIds.from_tokenizer(processor.tokenizer)
    samples = make_samples(2, seed=0)
    plain = collate(samples, processor, "stage3", latent_size=2)
    tagged = collate(samples, processor, "stage3", latent_size=2, label_observation_tags=True)
    tags = (plain.input_ids == ids.obs_start) | (plain.input_ids == ids.obs_end)
    assert tags.any()
    assert (plain.labels[tags] == -100).all()  # the reference ignores the tags
    assert (tagged.labels[tags] == plain.input_ids[tags]).all()
    assert torch.equal(plain.labels[~tags], tagged.labels[~tags])
    assert torch.equal(plain.observation_mask, tagged.observation_mask)
