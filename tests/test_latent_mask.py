"""`mask_from_ids` (monet_fast.latent_mask, exported as monet_fast.kernels.mask_from_ids): the
compact stage-2 mask from token ids alone equals collate's `masked_rows` on synthetic samples."""

import pytest
import torch
from monet_fast.kernels import mask_from_ids

from monet_fast.data import collate, make_samples
from monet_fast.model import tiny_processor
from monet_fast.model.tokens import TokenIds


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _mask(batch, tid: TokenIds) -> torch.Tensor:
    return mask_from_ids(
        batch.input_ids, tid.image_pad, tid.latent_start, tid.latent_pad,
        batch.attention_mask,
    )  # fmt: skip


@pytest.mark.parametrize("side", ["right", "left"])
def test_mask_from_ids_equals_collate(processor, side):
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    samples = make_samples(4, seed=3, n_distractors=1)
    batch = collate(samples, processor, "stage2", latent_size=3, padding_side=side)
    got = _mask(batch, tid)
    assert got.dtype == torch.int32 and got.shape == (*batch.input_ids.shape, 4)
    # Each sample has aux images: the mask is not trivially all padding / zeros.
    assert (got[..., 3] > 0).sum(-1).min() > 0
    assert torch.equal(got, batch.masked_rows)


def test_question_images_and_stage3_blocks_mask_nothing(processor):
    """Stage 3 has latent blocks but no aux images: nothing is masked but the padding, although
    the question image comes before the first block."""
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    batch = collate(make_samples(2, seed=1), processor, "stage3", latent_size=2)
    assert (batch.input_ids == tid.latent_start).any() and (batch.input_ids == tid.image_pad).any()  # fmt: skip
    got = _mask(batch, tid)
    pad = ~batch.attention_mask.bool()
    assert torch.equal(got[..., 1], pad.int() * got.shape[1])
    assert not got[..., [0, 2, 3]].any()


def test_mask_from_ids_rejects_bad_shapes():
    with pytest.raises(ValueError, match="input_ids must be"):
        mask_from_ids(torch.zeros(5, dtype=torch.long), 1, 2, 3)
    with pytest.raises(ValueError, match="attention_mask"):
        mask_from_ids(torch.zeros(2, 5, dtype=torch.long), 1, 2, 3, torch.ones(2, 4))
