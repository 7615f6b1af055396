"""`monet_fast.decode.slots`: requests joining and leaving a running batch decode exactly what
`generate()` decodes for each alone — eager, and on the CUDA-graph path (emulated on CPU)."""

from __future__ import annotations

import pytest
import torch

from monet_fast.decode import generate
from monet_fast.decode.inputs import prepare_batch
from monet_fast.decode.slots import SlotDecoder, SlotParams
from monet_fast.model.tokens import LATENT_END, LATENT_PAD, LATENT_START

EOS = 1002  # the tiny tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def tiny():
    from monet_fast.model.tiny import tiny_model

    return tiny_model(seed=0, initializer_range=0.2)


def _prompts(n: int) -> list:
    return [
        [{"role": "user", "content": f"What is in picture {i}? Count {i * 7}."}] for i in range(n)
    ]


def _serve(decoder: SlotDecoder, processor, jobs: list[tuple], steps_per_check: int = 2) -> list:
    """Run (input, SlotParams) jobs through `decoder`'s slots, joining as slots free up."""
    pending, running, done = list(enumerate(jobs)), {}, {}
    with torch.inference_mode():
        while pending or running:
            for slot in range(decoder.bufs.slots):
                if slot not in running and pending:
                    i, (item, params) = pending.pop(0)
                    decoder.prefill(slot, prepare_batch(processor, [item]), params)
                    running[slot] = (i, [])
            decoder.decode_steps(steps_per_check)
            for slot, (i, ids) in list(running.items()):
                new, _, _, _, mode = decoder.read(slot, len(ids))
                ids.extend(new)
                if mode == 2:  # MODE_DONE
                    decoder.release(slot)
                    done[i] = ids
                    del running[slot]
    return [done[i] for i in range(len(jobs))]


# Different lengths so requests leave at different times and later ones reuse slots.
LENGTHS = [5, 11, 3, 9, 6, 8]


@pytest.fixture(scope="module")
def alone(tiny):
    """generate() on each prompt by itself."""
    model, processor = tiny
    return [
        generate(model, processor, [p], max_new_tokens=n).sequences[0].tolist()
        for p, n in zip(_prompts(len(LENGTHS)), LENGTHS)
    ]


@pytest.mark.parametrize("emulate", [False, True], ids=["eager", "graph-path"])
def test_greedy_joins_equal_generate_alone(tiny, alone, emulate):
    model, processor = tiny
    decoder = SlotDecoder(model, processor, 3, 128, [EOS], EOS, emulate_graphs=emulate)
    jobs = [(p, SlotParams(n)) for p, n in zip(_prompts(len(LENGTHS)), LENGTHS)]
    assert _serve(decoder, processor, jobs) == alone


@pytest.mark.parametrize("layout", ["sft", "monet_vllm"])
def test_forced_latent_blocks_with_per_request_k(layout):
    """Forced START, per-request K: equal to generate() with that K on the START-ended prompt."""
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=1, initializer_range=0.2, latent_layout=layout)
    texts = [
        processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) + LATENT_START
        for p in _prompts(3)
    ]
    sizes = [2, 5, 3]
    decoder = SlotDecoder(model, processor, 2, 128, [EOS], EOS)
    jobs = [({"text": t}, SlotParams(10, latent_size=k)) for t, k in zip(texts, sizes)]
    got = _serve(decoder, processor, jobs)
    for text, k, ids in zip(texts, sizes, got):
        ref = generate(model, processor, [{"text": text}], max_new_tokens=10, latent_size=k)
        assert ids[1:] == ref.sequences[0].tolist()  # ids[0] is the forced START
        # The first block: START, then K slots (sft) or K-1 (monet_vllm: START's row is one), END.
        pad, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in (LATENT_PAD, LATENT_END))
        n = k if layout == "sft" else k - 1
        assert ids[1 : 1 + n] == [pad] * n and ids[1 + n] == end


def test_seeded_sampling_same_alone_and_batched_and_on_graph_path(tiny):
    model, processor = tiny
    prompts = _prompts(4)
    mine = SlotParams(12, do_sample=True, temperature=1.2, top_p=0.9, seed=7)
    alone = _serve(
        SlotDecoder(model, processor, 1, 96, [EOS], EOS), processor, [(prompts[0], mine)]
    )
    others = [(p, SlotParams(12, do_sample=True, seed=100 + i)) for i, p in enumerate(prompts[1:])]
    for emulate in (False, True):
        decoder = SlotDecoder(model, processor, 4, 96, [EOS], EOS, emulate_graphs=emulate)
        batched = _serve(decoder, processor, [*others, (prompts[0], mine)])
        assert batched[-1] == alone[0]
    reseeded = SlotParams(12, do_sample=True, temperature=1.2, top_p=0.9, seed=8)
    other = _serve(
        SlotDecoder(model, processor, 1, 96, [EOS], EOS), processor, [(prompts[0], reseeded)]
    )
    assert other[0] != alone[0]


def test_per_row_top_p_keeps_only_the_nucleus(tiny, alone):
    """A sampling row with a tiny top_p keeps only its top token, so it decodes greedily, while
    the row beside it samples from the full distribution (top_p is per slot)."""
    model, processor = tiny
    prompts = _prompts(2)
    nucleus = SlotParams(LENGTHS[0], do_sample=True, temperature=1.5, top_p=1e-6, seed=5)
    wide = SlotParams(LENGTHS[1], do_sample=True, temperature=1.5, top_p=1.0, seed=5)
    decoder = SlotDecoder(model, processor, 2, 96, [EOS], EOS)
    got = _serve(decoder, processor, [(prompts[0], nucleus), (prompts[1], wide)])
    assert got[0] == alone[0]
    assert got[1] != alone[1]
