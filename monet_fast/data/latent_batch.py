"""`LatentBatch`: the typed training/replay batch that `collate` builds and `latent_forward` reads.

One dataclass instead of a 15-key dict, so a misspelt field is an AttributeError at the line that
misspells it rather than a KeyError (or a silent `.get` default) deep inside the forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from monet_fast.stage import Stage

if TYPE_CHECKING:  # the layout type lives with the model's sequence code
    from monet_fast.model.sequence import SequenceLayout

# The fields a stock Hugging Face forward takes (what `model_inputs` returns).
HF_INPUTS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
)


@dataclass
class LatentBatch:
    """A padded batch for one stage. Shapes: B samples, L tokens.

    input_ids, attention_mask        [B, L]
    pixel_values, image_grid_thw     as the processor gives them (None without images)
    mm_token_type_ids                [B, L] 0 text / 1 image
    position_ids                     [3, B, L] mRoPE positions (== get_rope_index)
    labels                           [B, L] token ids or -100 (the model shifts)
    observation_mask                 [B, L] bool, labels the observation weight applies to
    latent_slot_mask                 [B, L] bool, `<abs_vis_token_pad>` latent slots
    masked_rows                      [B, L, 4] int32 compact stage-2 mask (stage 2 only, else None)
    layouts                          one `SequenceLayout` per sample
    stage, latent_size, keys         what was built and for which samples
    latent_layout                    "sft" (our SFT stages) or "monet_vllm" (VLPO replay of the
                                     released RL layout; see `monet_fast.model.latent`)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    observation_mask: torch.Tensor
    latent_slot_mask: torch.Tensor
    masked_rows: torch.Tensor | None
    layouts: list[SequenceLayout]
    stage: Stage
    latent_size: int
    keys: list[str]
    latent_layout: str = "sft"

    def __post_init__(self) -> None:
        self.stage = Stage.of(self.stage)

    def __getitem__(self, name: str) -> Any:
        # The batch used to be a dict; say how to read it now instead of a bare TypeError.
        raise TypeError(f"LatentBatch is a dataclass: use batch.{name}, not batch[{name!r}]")

    def _map_tensors(self, fn) -> LatentBatch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> LatentBatch:
        """A copy with every tensor on `device` (dtypes unchanged; layouts and keys shared)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LatentBatch:
        """A copy with every tensor in pinned host memory (what `DataLoader(pin_memory=True)`
        calls on a custom batch type), so a later `.to(cuda, non_blocking=True)` overlaps."""
        return self._map_tensors(lambda t: t.pin_memory())

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments a stock Hugging Face forward takes."""
        return {name: getattr(self, name) for name in HF_INPUTS}

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])


__all__ = ["HF_INPUTS", "LatentBatch"]
