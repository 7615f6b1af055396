"""Qwen3-VL (`transformers.Qwen3VLForConditionalGeneration`), e.g. Qwen3-VL-8B-Instruct.

What differs from Qwen2.5-VL:
  * DeepStack: the vision tower also returns features of some intermediate ViT blocks
    (`deepstack_visual_indexes`, 8B: [8, 16, 24]), each through its own merger; level i is added
    to the hidden states of the image tokens after decoder layer i. Our segment loops pass the
    columns' share of them to the stock text model (`visual_pos_masks`,
    `deepstack_visual_embeds`, `lm_kwargs`) or add them after each layer (`after_layer`), so a
    prompt split into segments gets exactly what one stock forward gives it.
  * Interleaved mRoPE (frequencies cycle t, h, w; 8B sections [24, 20, 20]), inside the stock
    rotary embedding; the position ids themselves are the same as Qwen2.5-VL's for images.
  * Patch 16 (32 x 32 pixels per LLM token), image mean/std 0.5, learned ViT position
    embeddings; q/k RMSNorm in attention and an explicit head_dim in the text config.
  * The Qwen3-VL Instruct chat template: no default system message.
"""

from __future__ import annotations

from typing import Any

import torch

from monet_fast.model.arch.base import ArchAdapter, DeepstackFeatures, register

# Verbatim the chat template of Qwen3-VL-8B-Instruct (chat_template.json).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def _cat(parts: Any) -> torch.Tensor:
    # transformers 5.2x splits features per image (a tuple); older releases return one tensor.
    return torch.cat(list(parts), dim=0) if isinstance(parts, (list, tuple)) else parts


class Qwen3VL(ArchAdapter):
    model_type = "qwen3_vl"
    display_name = "Qwen3-VL"
    patch_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    chat_template = QWEN3_VL_CHAT_TEMPLATE

    def model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        if isinstance(out, tuple):  # (embeds, deepstack) in releases before the output class
            embeds, deepstack = out
        else:
            embeds, deepstack = out.pooler_output, out.deepstack_features
        return _cat(embeds), [_cat(level) for level in deepstack or []]

    def lm_kwargs(self, deepstack: DeepstackFeatures | None) -> dict:
        selected = deepstack.selected() if deepstack is not None else None
        if selected is None:
            return {}
        mask, levels = selected
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": levels}

    def after_layer(
        self, layer_idx: int, states: torch.Tensor, deepstack: DeepstackFeatures | None
    ) -> torch.Tensor:
        return states if deepstack is None else deepstack.add(layer_idx, states)

    def tiny_text_defaults(self, ids: dict[str, int]) -> dict[str, Any]:
        # Three layers so that one layer runs after the two DeepStack levels, as in the 8B.
        return {"num_hidden_layers": 3}

    def tiny_rope(self, head_dim: int) -> dict[str, Any]:
        # The 8B's [24, 20, 20] of 64 frequencies: h = w = 5/16 of them, t the rest.
        half = head_dim // 2
        h = half * 5 // 16
        return {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": [half - 2 * h, h, h],
            "mrope_interleaved": True,
        }

    def tiny_vision_defaults(self) -> dict[str, Any]:
        return {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to each image
            "deepstack_visual_indexes": [0, 1],
        }


ADAPTER = register(Qwen3VL())
