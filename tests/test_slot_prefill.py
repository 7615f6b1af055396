"""`SlotDecoder.prefill_many`: requests of different prompt lengths, with and without images,
admitted together in one right-padded prefill decode exactly what each decodes alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monet_fast.decode import generate
from monet_fast.decode.inputs import prepare_batch
from monet_fast.decode.slot_batch import join_right_padded
from monet_fast.decode.slots import SlotDecoder, SlotParams
from monet_fast.model.tokens import LATENT_START

EOS = 1002  # the tiny tokenizer's <|im_end|>


def _image(seed: int, size: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _inputs(processor) -> list:
    """Five prompts of different lengths: two with images of different sizes, one forced."""
    short = [{"role": "user", "content": "Hi."}]
    long = [{"role": "user", "content": "Describe, step by step, what you see: " + "and " * 12}]
    img_a = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(1, 56)},
                {"type": "text", "text": "What?"},
            ],
        }
    ]
    img_b = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Count the shapes in this picture, please:"},
                {"type": "image", "image": _image(2, 84)},
            ],
        }
    ]
    forced = processor.apply_chat_template(
        [{"role": "user", "content": "Think in latents about it."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [short, img_a, long, img_b, {"text": forced + LATENT_START}]


def _decode_all(decoder: SlotDecoder, slots: list[int]) -> dict[int, list[int]]:
    out = {s: [] for s in slots}
    with torch.inference_mode():
        while any(decoder._occupied[s] for s in slots):
            decoder.decode_steps(3)
            for s in slots:
                if decoder._occupied[s]:
                    new, _, _, _, mode = decoder.read(s, len(out[s]))
                    out[s].extend(new)
                    if mode == 2:  # MODE_DONE
                        decoder.release(s)
    return out


@pytest.mark.parametrize("layout", ["sft", "monet_vllm"])
def test_batched_prefill_equals_generate_alone(layout):
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=3, initializer_range=0.2, latent_layout=layout)
    items = _inputs(processor)
    new = [9, 6, 12, 7, 10]
    batches = [prepare_batch(processor, [item]) for item in items]
    lengths = [b.input_ids.shape[1] for b in batches]
    assert len(set(lengths)) == len(lengths)  # every row padded differently
    assert sum(b.pixel_values is not None for b in batches) == 2
    # Slots out of order, one left free in between: rows map to slots, not to positions.
    slots = [4, 0, 2, 1, 5]
    decoder = SlotDecoder(model, processor, 6, 256, [EOS], EOS)
    with torch.inference_mode():
        decoder.prefill_many(
            [(s, b, SlotParams(n, latent_size=3)) for s, b, n in zip(slots, batches, new)]
        )
    got = _decode_all(decoder, slots)
    for item, s, n, forced in zip(items, slots, new, (False,) * 4 + (True,)):
        ref = generate(model, processor, [item], max_new_tokens=n, latent_size=3)
        ids = got[s][1:] if forced else got[s]  # a forced START is emission 0
        assert ids == ref.sequences[0].tolist(), f"slot {s}, prompt of {len(item)} message(s)"


def test_batched_prefill_seeded_sampling_unchanged():
    """A seeded sampled request decodes the same prefilled with others as alone."""
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=0, initializer_range=0.2)
    items = _inputs(processor)[:4]
    batches = [prepare_batch(processor, [item]) for item in items]
    mine = SlotParams(12, do_sample=True, temperature=1.3, top_p=0.9, seed=11)
    alone = SlotDecoder(model, processor, 1, 256, [EOS], EOS)
    with torch.inference_mode():
        alone.prefill(0, batches[1], mine)
    ref = _decode_all(alone, [0])[0]
    together = SlotDecoder(model, processor, 4, 256, [EOS], EOS)
    others = [SlotParams(8, do_sample=True, seed=i) for i in range(3)]
    with torch.inference_mode():
        together.prefill_many(
            [(0, batches[0], others[0]), (1, batches[1], mine)]
            + [(2 + i, batches[2 + i], p) for i, p in enumerate(others[1:])]
        )
    assert _decode_all(together, [0, 1, 2, 3])[1] == ref


def test_join_right_padded_rejects_padded_rows_and_prefill_many_checks_slots():
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=0)
    two = prepare_batch(processor, ["a b c d e f", "a"])
    with pytest.raises(ValueError, match="must be one unpadded row"):
        join_right_padded([two], 0)
    one = prepare_batch(processor, ["hello"])
    decoder = SlotDecoder(model, processor, 2, 64, [EOS], EOS)
    with pytest.raises(ValueError, match="a slot appears twice"):
        decoder.prefill_many([(0, one, SlotParams(4)), (0, one, SlotParams(4))])
    with pytest.raises(ValueError, match="exceeds the 64-token context"):
        decoder.prefill_many([(0, one, SlotParams(4)), (1, one, SlotParams(100))])


def test_scheduler_groups_under_caps_and_isolates_a_bad_request():
    """Admitted requests are prefilled in groups under both caps; a request that cannot be
    prefilled fails alone (400) while the rest of its group is served."""
    from monet_fast.model.tiny import tiny_model
    from monet_fast.serve.scheduler import Job, Scheduler, display_text

    model, processor = tiny_model(seed=0, initializer_range=0.2)
    sched = Scheduler(
        model,
        processor,
        slots=5,
        max_context=64,
        max_queue=0,
        max_prefill_batch=3,
        max_prefill_tokens=30,
        eos_ids=[EOS],
        fill_id=EOS,
    )
    events: dict[int, list] = {}

    def job(i: int, text: str, new: int) -> Job:
        batch = prepare_batch(processor, [text])
        return Job(batch, SlotParams(new), (), False, False, lambda k, v: events[i].append((k, v)))

    texts = ["a", "a b c d e f g h i j k l m n o p q r", "a b", "a b c", "a b c"]
    jobs = [job(i, t, 200 if i == 2 else 4) for i, t in enumerate(texts)]  # 2: over the context
    for i, j in enumerate(jobs):
        events[i] = []
        sched.queue.append(j)
    lengths = sorted(j.prompt_tokens for j in jobs)
    assert lengths[:4] == [1, 2, 3, 3] and 15 < lengths[4] <= 30  # (cap 3 rows, 30 padded tokens)
    admitted = sched._take_admissions()
    groups = sched._prefill_groups(admitted)
    # Rows cap after three; then 2 x the long prompt > 30 tokens: it goes alone.
    assert [[j.prompt_tokens for _, j in g] for g in groups] == [[1, 2, 3], [3], lengths[4:]]
    with torch.inference_mode():
        sched._iteration(admitted)
        while sched.running:
            sched._iteration([])
    assert events[2][0][0] == "error" and events[2][0][1].status == 400
    for i in (0, 1, 3, 4):
        alone = generate(model, processor, [texts[i]], max_new_tokens=4)
        done = events[i][-1]
        assert done[0] == "done"
        ids = alone.sequences[0].tolist()
        assert done[1].completion_tokens == len(ids)
        assert (
            done[1].text == display_text(ids, processor.tokenizer, (EOS,), sched.start_id, False)[0]
        )
