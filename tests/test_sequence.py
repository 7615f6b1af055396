"""Sequence layout on token ids: the reference's oracles (REFERENCE.md §8) on hand-built rows."""

import pytest
import torch

from monet_fast.data.types import Sample, Segment
from monet_fast.model import sequence as seq
from monet_fast.model.tokens import TokenIds

# Small fake ids; ANS stands for the `<|im_start|>assistant` pattern.
IDS = TokenIds(
    latent_pad=20,
    latent_start=21,
    latent_end=22,
    obs_start=23,
    obs_end=24,
    im_start=25,
    im_end=26,
    endoftext=0,
    vision_start=11,
    vision_end=12,
    image_pad=13,
)
ANS = [25, 30]
t = 5
VS, VE, IP, S, PAD, E, OS, OE = 11, 12, 13, 21, 20, 22, 23, 24

# REFERENCE.md §8 oracle 6 with the assistant header at 4 (so the second image is auxiliary):
# 0:t 1:VS 2:IP 3:VE 4:ANS(2 tokens) 6:VS 7:IP 8:IP 9:VE 10:S 11:PAD 12:PAD 13:E 14:OS 15:t 16:OE 17:t
ROW = [t, VS, IP, VE, *ANS, VS, IP, IP, VE, S, PAD, PAD, E, OS, t, OE, t]


def test_layout_finds_blocks_images_observations():
    lay = seq.layout_from_ids(ROW, IDS, ANS)
    assert lay.assistant_start == 6
    assert lay.aux_images == [(7, 9)]
    assert len(lay.latent_blocks) == 1
    blk = lay.latent_blocks[0]
    assert (blk.start, blk.slots, blk.end, blk.aux_image) == (10, (11, 13), 13, (7, 9))
    assert lay.observation_spans == [(14, 16)]
    assert lay.observation_positions == [14, 15]
    assert lay.slot_positions == [11, 12]


def test_stage2_mask_matches_reference_oracle():
    lay = seq.layout_from_ids(ROW, IDS, ANS)
    allowed = seq.allowed_mask(seq.masked_rows_from_layout([lay]), len(ROW))
    assert allowed.shape == (1, 1, len(ROW), len(ROW)) and allowed.dtype == torch.bool
    expected = torch.ones(len(ROW), len(ROW)).tril().bool()
    for q in range(len(ROW)):
        if q not in (11, 12):
            expected[q, 7:9] = False
    assert torch.equal(allowed[0, 0], expected)
    # Spot rows from the oracle (shifted by the extra ANS token): image pads do not see
    # each other nor themselves; slots see them; later text does not.
    assert allowed[0, 0, 8].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert allowed[0, 0, 11].nonzero().flatten().tolist() == list(range(12))
    assert allowed[0, 0, 17].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, *range(9, 18)]


def test_mask_handles_padding_and_batches():
    short = [t, VS, IP, VE, *ANS, t, t]
    rows = [ROW, short + [0] * (len(ROW) - len(short))]
    attn = torch.tensor([[1] * len(ROW), [1] * len(short) + [0] * (len(ROW) - len(short))])
    lays = [seq.layout_from_ids(r, IDS, ANS, a.tolist()) for r, a in zip(rows, attn)]
    mr = seq.masked_rows_from_layout(lays)
    assert mr.shape == (2, len(ROW), 4) and mr.dtype == torch.int32
    dense = seq.allowed_mask(mr, len(ROW))
    # padding columns hidden from every row; row 1 is plain causal otherwise
    assert not dense[1, 0, :, len(short) :].any()
    assert torch.equal(
        dense[1, 0, : len(short), : len(short)],
        torch.ones(len(short), len(short)).tril().bool(),
    )
    assert torch.equal(dense, seq.allowed_mask(mr, len(ROW), attn))


def test_labels_follow_reference_rule():
    lay = seq.layout_from_ids(ROW, IDS, ANS)
    labels = seq.labels_for_row(ROW, lay, seq.ignored_label_ids(IDS, "stage2"))
    assert labels[:6] == [-100] * 6  # up to and including the assistant header
    assert labels[10] == S  # <abs_vis_token> is predicted
    assert labels[11] == labels[12] == labels[13] == -100  # slots and </abs_vis_token>
    assert labels[14] == labels[16] == -100  # observation tags
    assert labels[15] == t and labels[17] == t
    stage1 = seq.labels_for_row(ROW, lay, seq.ignored_label_ids(IDS, "stage1"))
    assert stage1[11] == PAD  # stage 1 has no latent tokens to ignore
    assert seq.observation_label_mask(lay) == [p == 15 for p in range(len(ROW))]


def test_no_assistant_header_means_no_labels():
    row = [t, VS, IP, VE, t]
    lay = seq.layout_from_ids(row, IDS, ANS)
    assert seq.labels_for_row(row, lay, set()) == [-100] * len(row)
    assert lay.latent_blocks == [] and lay.observation_spans == []


def _sample():
    from PIL import Image

    img = Image.new("RGB", (56, 56), "red")
    return Sample(
        question=[Segment("image", image=img), Segment("text", text="Q?")],
        reasoning=[
            Segment("text", text="Look."),
            Segment("aux_image", image=img),
            Segment("observation", text="red"),
            Segment("answer", text="\\boxed{A}"),
        ],
        answer="A",
    )


def test_render_per_stage():
    s = _sample()
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    block = "<abs_vis_token>" + "<abs_vis_token_pad>" * 2 + "</abs_vis_token>"
    head = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{img}Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    tail = "<observation>red</observation>\\boxed{A}<|im_end|>\n"
    text, images = seq.render(s, "stage1", 2)
    assert text == head + "Look." + img + tail and len(images) == 2
    text, images = seq.render(s, "stage2", 2)
    assert text == head + "Look." + img + block + tail and len(images) == 2
    text, images = seq.render(s, "stage3", 2)
    assert text == head + "Look." + block + tail and len(images) == 1
    assert seq.render(s, "infer", 2) == seq.render(s, "stage3", 2)
    with pytest.raises(ValueError, match="stage must be one of"):
        seq.render(s, "stage4")
    with pytest.raises(ValueError, match="latent_size"):
        seq.render(s, "stage2", 0)
