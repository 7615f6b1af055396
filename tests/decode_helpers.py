"""Shared helpers of the decoding tests (test_decode.py, test_decode_graphs.py): the tiny test
models, prompts, a graph-safe forcing logits processor, and a margin-aware token comparison for
runs whose floating-point arithmetic differs (CPU vs GPU, graph vs eager, bf16)."""

from __future__ import annotations

import functools

import torch

from monet_fast.model.sequence import render_prompt
from monet_fast.model.tokens import IM_END, LATENT_END, LATENT_PAD, LATENT_START

LAYOUTS = ("sft", "monet_vllm")
K = 3  # latent_size saved in the test models' configs


@functools.cache
def decode_model(layout: str, arch: str = "qwen2_5_vl"):
    """(model, processor): the tiny fp32 CPU model of `arch`, shared by the tests (do not
    modify it)."""
    from monet_fast.model.tiny import tiny_model

    # A larger init range than the default makes the random model's greedy text depend on its
    # inputs (with 0.02 it repeats one token), so a wrong latent or position changes the output.
    return tiny_model(seed=0, latent_size=K, latent_layout=layout, initializer_range=0.2, arch=arch)


@functools.cache
def _samples():
    from monet_fast.data.synthetic import make_samples

    return make_samples(3, seed=0)


def image_inputs(n: int = 3) -> list[dict]:
    return [{"text": render_prompt(s), "images": list(s.question_images)} for s in _samples()[:n]]


def text_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def latent_inputs(processor) -> list[dict]:
    """Two image prompts, one image prompt ending with START, one text-only prompt."""
    items = image_inputs(2)
    items.append(
        {"text": image_inputs(3)[2]["text"] + LATENT_START, "images": image_inputs(3)[2]["images"]}
    )
    items.append({"text": text_prompt(processor, "How many red circles?")})
    return items


def ids_of(processor):
    tok = processor.tokenizer
    return {
        name: tok.convert_tokens_to_ids(t)
        for name, t in (
            ("S", LATENT_START),
            ("E", LATENT_END),
            ("PAD", LATENT_PAD),
            ("EOS", IM_END),
        )
    }


def force_at(schedule: dict[int, int]):
    """Logits processor: at output index i, add a large bonus to token schedule[i] (every row).

    Graph-safe (CUDA-graph capturable): the bonus is a tensor expression of `index`, no
    boolean-mask indexing and no host sync.
    """

    def processor(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        for i, tok in schedule.items():
            logits[:, tok] += (index == i).to(logits.dtype) * 1e6
        return logits

    return processor


def sequences(out) -> list[list[int]]:
    return [s.tolist() for s in out.sequences]


class MarginRecorder:
    """Wraps a logits processor and records each row's top-2 logit margin per output index.

    For eager runs only (a graph would record once, at capture). `margin(row, i)` is the gap
    between the best and second-best processed logit when row's output token i was sampled.
    """

    def __init__(self, processor=None) -> None:
        self.processor = processor
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.processor is not None:
            logits = self.processor(logits, index)
        top = logits.topk(2, dim=-1).values
        self.records.append((index.detach().clone(), (top[:, 0] - top[:, 1]).detach().clone()))
        return logits

    def margins(self) -> dict[tuple[int, int], float]:
        table = {}
        for index, margin in self.records:
            for row, (i, m) in enumerate(zip(index.cpu().tolist(), margin.cpu().tolist())):
                if i >= 0:
                    table[(row, i)] = m
        return table


def assert_tokens_match(got, want, recorder: MarginRecorder, tol: float) -> list[bool]:
    """Token-exact agreement, except where floating-point noise may legitimately decide.

    Two runs may part only at an output index where the reference run (`want`, decoded with
    `recorder` as its logits processor) had a top-2 logit margin below `tol`; after that point
    the inputs differ and nothing more is compared. Returns, per row, whether the sequences are
    identical (the rows whose latents can be compared).
    """
    margins = recorder.margins()
    same = []
    for row, (g, w) in enumerate(zip(sequences(got), sequences(want))):
        part = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if part is None and len(g) != len(w):
            part = min(len(g), len(w))
        if part is not None:
            margin = margins.get((row, part))
            assert margin is not None and margin < tol, (
                f"row {row} parts at output index {part} (got {g[part : part + 3]}..., want "
                f"{w[part : part + 3]}...) where the reference's top-2 margin is {margin}, not "
                f"below {tol}: a real difference, not rounding\ngot  {g}\nwant {w}"
            )
        same.append(part is None)
    return same
