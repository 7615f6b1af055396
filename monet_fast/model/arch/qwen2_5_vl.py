"""Qwen2.5-VL (`transformers.Qwen2_5_VLForConditionalGeneration`): the reference's base model.

Image features: the windowed ViT + merger output, one row per merged 2x2 patch block (patch 14,
so 28 x 28 pixels per LLM token). Positions: 3-D mRoPE with contiguous (t, h, w) frequency
sections (7B: [16, 24, 24]). No per-layer visual inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from monet_fast.model.arch.base import ArchAdapter, register
from monet_fast.model.processor import QWEN2_VL_CHAT_TEMPLATE


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2.5-VL-7B splits head_dim/2 = 64 rotary frequencies as [16, 24, 24] over (t, h, w);
    # keep the same 1:3:3 proportions.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


class Qwen25VL(ArchAdapter):
    model_type = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    patch_size = 14
    chat_template = QWEN2_VL_CHAT_TEMPLATE

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0), []

    def tiny_text_defaults(self, ids: dict[str, int]) -> dict[str, Any]:
        return {
            "use_sliding_window": False,
            "bos_token_id": ids["endoftext"],
            "eos_token_id": ids["im_end"],
        }

    def tiny_rope(self, head_dim: int) -> dict[str, Any]:
        return {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": _mrope_section(head_dim),
        }

    def tiny_vision_defaults(self) -> dict[str, Any]:
        return {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "window_size": 112,
            "fullatt_block_indexes": [0],
            "tokens_per_second": 2,
        }


ADAPTER = register(Qwen25VL())
