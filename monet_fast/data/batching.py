"""Collate: samples -> a padded model batch for one stage (ids, images, labels, layout, masks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monet_fast.data.latent_batch import LatentBatch
from monet_fast.data.types import Sample
from monet_fast.model import sequence as seq
from monet_fast.model.arch import get_arch
from monet_fast.model.tokens import TokenIds


def assistant_pattern(tokenizer) -> list[int]:
    """Ids of `<|im_start|>assistant` (reference: [151644, 77091] on Qwen2.5)."""
    return tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)


def collate(
    samples: Sequence[Sample],
    processor,
    stage: str,
    latent_size: int = 8,
    *,
    padding_side: str = "right",
    label_observation_tags: bool = False,
) -> LatentBatch:
    """Tokenise `samples` for `stage` and build everything the losses and the latent forward need.

    Returns a `LatentBatch` (its docstring lists the fields and shapes).

    label_observation_tags: give `<observation>`/`</observation>` CE labels (the reference
    ignores them; see `monet_fast.model.sequence.ignored_label_ids`).
    """
    seq.check_stage(stage)
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts, images = [], []
    for sample in samples:
        text, imgs = seq.render(sample, stage, latent_size)
        for img in imgs:
            if img is None:
                raise ValueError(f"sample {sample.key} ({sample.source}): image not loaded")
        texts.append(text)
        images += imgs

    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side

    token_ids = TokenIds.from_tokenizer(tokenizer)
    pattern = assistant_pattern(tokenizer)
    ignore = seq.ignored_label_ids(token_ids, stage, label_observation_tags)
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    layouts, labels, obs = [], [], []
    for b in range(input_ids.shape[0]):
        row = input_ids[b].tolist()
        lay = seq.layout_from_ids(row, token_ids, pattern, attention_mask[b].tolist())
        if stage != "stage1" and len(lay.latent_blocks) != len(samples[b].aux_images):
            raise ValueError(
                f"sample {samples[b].key}: expected {len(samples[b].aux_images)} latent blocks, "
                f"found {len(lay.latent_blocks)} after tokenisation"
            )
        layouts.append(lay)
        labels.append(seq.labels_for_row(row, lay, ignore))
        obs.append(seq.observation_label_mask(lay))

    latent_slot_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, lay in enumerate(layouts):
        latent_slot_mask[b, lay.slot_positions] = True
    grid = enc.get("image_grid_thw")
    merge = getattr(processor.image_processor, "merge_size", 2)
    return LatentBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=grid,
        mm_token_type_ids=enc["mm_token_type_ids"],
        position_ids=get_arch(getattr(processor, "model_type", None)).rope_index(
            input_ids, enc["mm_token_type_ids"], grid, attention_mask, merge
        ),
        labels=torch.tensor(labels, dtype=torch.long),
        observation_mask=torch.tensor(obs, dtype=torch.bool),
        latent_slot_mask=latent_slot_mask,
        masked_rows=seq.masked_rows_from_layout(layouts) if stage == "stage2" else None,
        layouts=layouts,
        stage=stage,
        latent_size=latent_size,
        keys=[s.key for s in samples],
    )
