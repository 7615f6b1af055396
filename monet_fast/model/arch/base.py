"""The architecture seam: what differs between base models, behind one small interface.

Everything outside `monet_fast.model.arch` reaches a base model's internals through an
`ArchAdapter` looked up by the HF `model_type` (`get_arch`, `arch_of`): the model and config
classes, the text model and its decoder layers, the input embeddings, the vision tower and its
image features, the 3-D mRoPE position ids, processor facts (chat template, image patch size)
and the tiny test config. One module per base model registers one adapter.

The base class holds what the Qwen-VL family shares (`model.model.language_model`,
`model.model.visual`, the mRoPE index of `monet_fast.model.sequence.rope_position_ids`);
subclasses override what differs. Extra per-layer visual inputs (Qwen3-VL's DeepStack) travel
as a `DeepstackFeatures` next to the input embeddings; the segment-by-segment loops slice it by
columns exactly like the embeddings and hand it to the text model (`lm_kwargs`) or, in loops
that call the decoder layers themselves, apply it after each layer (`after_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, ArchAdapter] = {}


@dataclass
class DeepstackFeatures:
    """Visual features added to the hidden states of image tokens after the first decoder layers.

    index: [B, L] long, per position the row of each level it receives (-1: not an image token).
    levels: per decoder layer 0..n-1, [N, H] features (one row per image token of the batch).
    present: `index >= 0` on the host, so that a segment without image tokens is skipped
    without a device sync. Slicing by rows/columns keeps the rows addressed explicitly, so any
    re-layout that moves positions (padding columns, per-sample trimming) keeps every token
    paired with its feature.
    """

    index: torch.Tensor
    levels: list[torch.Tensor]
    present: torch.Tensor

    def columns(self, c0: int, c1: int) -> DeepstackFeatures:
        return DeepstackFeatures(self.index[:, c0:c1], self.levels, self.present[:, c0:c1])

    def rows(self, b0: int, b1: int) -> DeepstackFeatures:
        return DeepstackFeatures(self.index[b0:b1], self.levels, self.present[b0:b1])

    def relayout(self, cols: list[torch.Tensor], length: int) -> DeepstackFeatures:
        """Move positions to new columns: cols[b][p] is position p's column (-1: dropped)."""
        out = self.index.new_full((self.index.shape[0], length), -1)
        for b, col in enumerate(cols):
            keep = col >= 0
            out[b, col[keep].to(out.device)] = self.index[b, keep.to(out.device)]
        present = torch.zeros(out.shape, dtype=torch.bool)
        for b, col in enumerate(cols):
            keep = col >= 0
            present[b, col[keep]] = self.present[b, keep]
        return DeepstackFeatures(out, self.levels, present)

    def selected(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(mask [B, L], per level the features of the masked positions in row-major order),
        or None when no image token is in these columns."""
        if not bool(self.present.any()):
            return None
        mask = self.index >= 0
        rows = self.index[mask]
        return mask, [level[rows] for level in self.levels]

    def add(self, layer_idx: int, states: torch.Tensor) -> torch.Tensor:
        """states + level `layer_idx` at the image tokens (out of place, as the stock model)."""
        if layer_idx >= len(self.levels) or not bool(self.present.any()):
            return states
        mask = self.index >= 0
        feats = self.levels[layer_idx][self.index[mask]].to(states.device, states.dtype)
        states = states.clone()
        states[mask] = states[mask] + feats
        return states


@dataclass
class VisualInputs:
    """Input embeddings [B, L, H] with image features scattered in, plus any per-layer extras."""

    embeds: torch.Tensor
    deepstack: DeepstackFeatures | None = None


class ArchAdapter:
    """Base-model specifics. Subclasses set the class attributes and override what differs."""

    model_type: ClassVar[str]
    display_name: ClassVar[str]
    # Image processor defaults: one LLM token per merge x merge patches of patch_size pixels.
    patch_size: ClassVar[int]
    merge_size: ClassVar[int] = 2
    temporal_patch_size: ClassVar[int] = 2
    image_mean: ClassVar[tuple[float, float, float] | None] = None  # None: the processor's
    image_std: ClassVar[tuple[float, float, float] | None] = None
    chat_template: ClassVar[str]

    # ---------------------------------------------------------------- classes

    def model_class(self) -> type:
        raise NotImplementedError

    def config_class(self) -> type:
        return self.model_class().config_class  # the HF model class names its config class

    def text_config_class(self) -> type:
        return self.config_class().sub_configs["text_config"]

    # ---------------------------------------------------------- module access

    def language_model(self, model: Any) -> Any:
        """The text model (embeddings aside): rotary_emb, layers, norm; callable with
        inputs_embeds / position_ids / attention_mask / cache."""
        return model.model.language_model

    def decoder_layers(self, model: Any) -> Any:
        return self.language_model(model).layers

    def input_embeddings(self, model: Any) -> Any:
        return model.get_input_embeddings()

    def visual(self, model: Any) -> Any:
        """The vision tower (ViT + merger), frozen in every training stage."""
        return model.model.visual

    def spatial_merge_size(self, model: Any) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    # ----------------------------------------------------------------- inputs

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features [N, H] for the N image tokens in order, per-layer extras [N, H] or [])."""
        raise NotImplementedError

    def embed(
        self,
        model: Any,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> VisualInputs:
        """Token embeddings with image features scattered into the image-pad rows."""
        ids = input_ids.to(model.device)
        embeds = self.input_embeddings(model)(ids)
        if pixel_values is None:
            return VisualInputs(embeds)
        feats, extra = self.image_features(
            model, pixel_values.to(model.device, model.dtype), image_grid_thw.to(model.device)
        )
        image_mask = ids == model.config.image_token_id
        n_tokens = int(image_mask.sum())
        if n_tokens != feats.shape[0]:
            raise ValueError(
                f"batch has {n_tokens} image tokens but the images give {feats.shape[0]} features"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))
        deepstack = None
        if extra:
            index = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
            index[image_mask] = torch.arange(n_tokens, device=ids.device)
            levels = [e.to(embeds.dtype) for e in extra]
            deepstack = DeepstackFeatures(index, levels, image_mask.cpu())
        return VisualInputs(embeds, deepstack)

    def rope_index(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        spatial_merge_size: int = 2,
    ) -> torch.Tensor:
        """3-D mRoPE position ids [3, B, L] (== the stock `get_rope_index` for images)."""
        from monet_fast.model.sequence import rope_position_ids

        return rope_position_ids(
            input_ids, mm_token_type_ids, image_grid_thw, attention_mask, spatial_merge_size
        )

    def lm_kwargs(self, deepstack: DeepstackFeatures | None) -> dict:
        """Extra keyword arguments of one `language_model(...)` call over some columns."""
        return {}

    def after_layer(
        self, layer_idx: int, states: torch.Tensor, deepstack: DeepstackFeatures | None
    ) -> torch.Tensor:
        """What the stock text model does between decoder layer `layer_idx` and the next, for
        loops that call the layers themselves (the decode engine)."""
        return states

    # -------------------------------------------------------------- processor

    def image_processor(
        self, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs: Any
    ) -> Any:
        from monet_fast.model.processor import qwen_image_processor

        kwargs.setdefault("patch_size", self.patch_size)
        kwargs.setdefault("merge_size", self.merge_size)
        kwargs.setdefault("temporal_patch_size", self.temporal_patch_size)
        if self.image_mean is not None:
            kwargs.setdefault("image_mean", list(self.image_mean))
            kwargs.setdefault("image_std", list(self.image_std or self.image_mean))
        return qwen_image_processor(min_pixels=min_pixels, max_pixels=max_pixels, **kwargs)

    # ------------------------------------------------------------------- tiny

    def tiny_text_defaults(self, ids: dict[str, int]) -> dict[str, Any]:
        """Text-config fields of the tiny model beyond the shared ones (`model.tiny`); `ids`
        are the tokenizer's special-token ids by `TokenIds` field name."""
        return {}

    def tiny_rope(self, head_dim: int) -> dict[str, Any]:
        """rope_parameters of the tiny model (the mRoPE sections scaled to its head_dim)."""
        raise NotImplementedError

    def tiny_vision_defaults(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"


def register(adapter: ArchAdapter) -> ArchAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_type: str | None) -> ArchAdapter:
    """The adapter for an HF `model_type` ("qwen2_5_vl", "qwen3_vl"); None = the default."""
    if model_type is None:
        model_type = DEFAULT_ARCH
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture (model_type) {model_type!r}; monet_fast supports "
            f"{supported()} — adding one is one adapter module in monet_fast/model/arch/"
        ) from None


def arch_of(model: Any) -> ArchAdapter:
    """The adapter of a model (a peft wrapper too), from `model.config.model_type`."""
    from monet_fast.model.unwrap import unwrap

    return get_arch(getattr(unwrap(model).config, "model_type", None))


DEFAULT_ARCH = "qwen2_5_vl"
