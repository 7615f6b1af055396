"""Latent-feedback decoding: the C++ state machine, generate() against a no-cache oracle, HF
generate, batching, stops, bad inputs, the CLI, the CUDA latent step. CUDA-graph decoding is
tested in test_decode_graphs.py; shared helpers are in decode_helpers.py.

The oracle (`reference_decode`) is written from the rule, not from the engine: one input at a
time, the full forward recomputed over every input so far at each step (no KV cache), and the
latent rule in plain Python — the sft rule as stated in DESIGN.md, the monet_vllm rule as the
reference vLLM runner writes it (active / pending / current_len; REFERENCE.md §6, oracle 13).
"""

from __future__ import annotations

import re

import pytest
import torch
from archs import ARCHS
from decode_helpers import (
    LAYOUTS,
    K,
    decode_model,
    force_at,
    ids_of,
    image_inputs,
    latent_inputs,
    text_prompt,
)

from monet_fast import _ops
from monet_fast.decode import collapse_latent_spans, generate, render_latent_text
from monet_fast.decode.pyloop import generate_python_loop
from monet_fast.model.latent import embed_inputs
from monet_fast.model.sequence import rope_position_ids
from monet_fast.model.tokens import IM_END, LATENT_END, LATENT_START

# ------------------------------------------------------------------------------- oracle


@torch.no_grad()
def reference_decode(
    model,
    processor,
    item: dict,
    *,
    max_new_tokens: int,
    latent_size: int,
    layout: str,
    logits_processor=None,
    max_blocks: int | None = None,
) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Greedy latent decoding of one {"text", "images"} input, full forward at every step.

    Returns (output ids, latent vectors per block). Output conventions as generate(): a fed-back
    step shows as the latent pad id; the sampled placeholders of monet_vllm too.
    """
    ids = ids_of(processor)
    S, E, PAD = ids["S"], ids["E"], ids["PAD"]
    eos = {model.generation_config.eos_token_id}
    cap = max_blocks if max_blocks is not None else 10**9
    lm = model.model.language_model
    embed = model.get_input_embeddings()

    text = item["text"]
    starts_latent = text.endswith(LATENT_START)
    # sft keeps START's embedding, so it stays in the prompt; monet_vllm overwrites START's row
    # with the hidden state before it, so that row is fed as a latent below.
    prompt = text[: -len(LATENT_START)] if starts_latent and layout == "monet_vllm" else text
    enc = processor(text=[prompt], images=item.get("images") or None, return_tensors="pt")
    inputs = [embed_inputs(model, dict(enc))[0]]  # rows of input embeddings
    deepstack = _stock_deepstack(model, enc)
    positions = [
        rope_position_ids(
            enc["input_ids"], enc["mm_token_type_ids"], enc.get("image_grid_thw"), None, 2
        )[:, 0]
    ]
    next_pos = int(positions[0].max()) + 1

    def forward_last() -> torch.Tensor:
        x = torch.cat(inputs).unsqueeze(0)
        pos = torch.cat(positions, dim=1).unsqueeze(1)
        extra = {}
        if deepstack is not None:  # Qwen3-VL: the stock text model adds them to image tokens
            mask, levels = deepstack
            visual = torch.zeros(1, x.shape[1], dtype=torch.bool)
            visual[0, : mask.numel()] = mask
            extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": levels}
        out = lm(inputs_embeds=x, position_ids=pos, use_cache=False, **extra)
        return out.last_hidden_state[0, -1]

    out: list[int] = []
    blocks: list[list[torch.Tensor]] = []
    # sft state
    slots_left: int | None = None
    # monet_vllm state, named as in the reference runner
    active, pending, current_len = False, None, 0
    h = forward_last()
    if starts_latent:
        blocks.append([])
        if layout == "sft":
            slots_left = latent_size
        else:
            # START (from the prompt) is "sampled": its own row is fed the hidden state before it.
            active, current_len = True, 1
            blocks[-1].append(h)
            inputs.append(h.unsqueeze(0))
            positions.append(torch.full((3, 1), next_pos, dtype=torch.long))
            next_pos += 1
            h = forward_last()
    while len(out) < max_new_tokens:
        feed = None
        if layout == "sft" and slots_left is not None:
            # Inside an sft block: no LM head; K slots fed back, then END forced.
            if slots_left > 0:
                emit, feed = PAD, h
                slots_left -= 1
            else:
                emit, slots_left = E, None
        else:
            logits = model.lm_head(h).float()
            if not active and slots_left is None and len(blocks) >= cap:
                logits[S] = float("-inf")
            if logits_processor is not None:
                logits = logits_processor(logits[None], torch.tensor([len(out)]))[0]
            tok = int(logits.argmax())
            emit = tok
            if layout == "sft":
                if tok == S and len(blocks) < cap:
                    slots_left = latent_size
                    blocks.append([])
            else:
                was_active = active
                if not active and tok == S and len(blocks) < cap:
                    active = True
                    blocks.append([])
                elif active and (tok == E or current_len >= latent_size):
                    active, pending, current_len = False, None, 0
                    emit = tok = E
                if active:
                    pending = h
                    current_len += 1
                    if was_active and tok not in eos:
                        emit = PAD  # a sampled placeholder
                # A sampled EOS placeholder stops the request before its pending row is fed.
                feed = pending if emit not in eos else None
        if feed is not None:
            blocks[-1].append(feed)
        out.append(emit)
        if emit in eos:
            break
        if layout == "monet_vllm":
            pending = None  # consumed as the next input row
        inputs.append(feed.unsqueeze(0) if feed is not None else embed.weight[emit][None])
        positions.append(torch.full((3, 1), next_pos, dtype=torch.long))
        next_pos += 1
        h = forward_last()
    return out, blocks


def _stock_deepstack(model, enc) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Qwen3-VL's DeepStack features of one prompt straight from the stock vision tower:
    (image-token mask [L], per-level [N, H]); None for models without them or no image."""
    if enc.get("pixel_values") is None or not hasattr(
        model.config.vision_config, "deepstack_visual_indexes"
    ):
        return None
    out = model.model.get_image_features(
        enc["pixel_values"], enc["image_grid_thw"], return_dict=True
    )
    levels = [torch.cat(list(level)) for level in out.deepstack_features]
    return enc["input_ids"][0] == model.config.image_token_id, levels


def assert_latents_match(got: torch.Tensor, counts: list[int], want: list[list[torch.Tensor]]):
    assert counts == [len(b) for b in want]
    for j, block in enumerate(want):
        if block:
            # fp32 with a KV cache vs a full recompute: summation order differs, 1e-4 is ample.
            torch.testing.assert_close(
                got[j, : len(block)], torch.stack(block), atol=1e-4, rtol=1e-4
            )
        assert not got[j, len(block) :].any()


# ------------------------------------------------------------------- C++ state machine


def _random_state(batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randint(0, 3, (batch,), dtype=torch.int32, generator=gen),  # mode
        torch.randint(0, 5, (batch,), dtype=torch.int32, generator=gen),  # count
        torch.randint(0, 3, (batch,), dtype=torch.int32, generator=gen),  # n_blocks
        torch.randint(1, 6, (batch,), dtype=torch.int32, generator=gen),  # remaining
    ]


def _step_args(sampled, hidden, table, state, *, layout=0, latent_size=3, max_blocks=2, eos=(5, 6)):
    """Keyword arguments of one latent_step call: START 3, END 4, slot 9, fill 0."""
    rows, width = hidden.shape
    device = hidden.device
    mode, count, n_blocks, remaining = state
    return dict(
        sampled_ids=sampled,
        hidden=hidden,
        embed_weight=table,
        eos_ids=torch.tensor(eos, device=device),
        mode=mode,
        count=count,
        n_blocks=n_blocks,
        remaining=remaining,
        emit_ids=torch.empty(rows, dtype=torch.long, device=device),
        use_hidden=torch.empty(rows, dtype=torch.bool, device=device),
        next_embeds=torch.empty(rows, width, dtype=hidden.dtype, device=device),
        layout=layout,
        latent_size=latent_size,
        start_id=3,
        end_id=4,
        slot_id=9,
        fill_id=0,
        max_blocks=max_blocks,
    )


def _run_latent_step(fn, sampled, hidden, table, state, layout) -> list[torch.Tensor]:
    args = _step_args(sampled, hidden, table, state, layout=layout)
    fn(**args)
    return [args["emit_ids"], args["use_hidden"], args["next_embeds"]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_latent_step_cpp_matches_torch(layout):
    gen = torch.Generator().manual_seed(0)
    batch, hidden, vocab = 37, 16, 12
    table = torch.randn(vocab, hidden, generator=gen)
    lay = _ops.LAYOUT_IDS[layout]
    for trial in range(40):
        state = _random_state(batch, gen)
        state_ref = [t.clone() for t in state]
        for _ in range(6):
            sampled = torch.randint(0, vocab, (batch,), generator=gen)
            sampled[torch.rand(batch, generator=gen) < 0.3] = 3  # START often
            h = torch.randn(batch, hidden, generator=gen)
            got = _run_latent_step(_ops.latent_step, sampled, h, table, state, lay)
            want = _run_latent_step(_ops.latent_step_torch, sampled, h, table, state_ref, lay)
            for a, b in zip(state + got, state_ref + want):
                assert torch.equal(a, b), f"trial {trial}"


def test_latent_step_checks_inputs():
    h, table = torch.zeros(2, 4), torch.zeros(10, 4)
    ok = torch.zeros(2, dtype=torch.long)
    state = [torch.zeros(2, dtype=torch.int32) for _ in range(4)]
    with pytest.raises(RuntimeError, match="latent_size must be >= 1, got 0"):
        _ops.latent_step(**_step_args(ok, h, table, state, latent_size=0))
    with pytest.raises(RuntimeError, match="mode must be Int, got Long"):
        _ops.latent_step(**_step_args(ok, h, table, [state[0].long()] + state[1:]))
    with pytest.raises(RuntimeError, match="hidden must have the dtype of embed_weight"):
        _ops.latent_step(**_step_args(ok, h.double(), table, state))
    with pytest.raises(RuntimeError, match="outside the embedding table"):
        _ops.latent_step(**_step_args(torch.full((2,), 99), h, table, state))


def _drive(stream: list[int], layout: int, k: int = 3) -> tuple[list[int], list[int | None]]:
    """Feed a sampled stream through latent_step for one sequence; hidden at step i = i+1.

    Returns the emitted ids and, per step, the value of the fed-back hidden state (None when the
    next input is the emitted token's embedding).
    """
    vocab, hidden = 20, 4
    table = torch.arange(vocab * hidden, dtype=torch.float32).view(vocab, hidden) + 1000
    state = [torch.tensor([v], dtype=torch.int32) for v in (0, 0, 0, 99)]
    emitted, fed = [], []
    for i, tok in enumerate(stream):
        h = torch.full((1, hidden), float(i + 1))
        args = _step_args(
            torch.tensor([tok]),
            h,
            table,
            state,
            layout=layout,
            latent_size=k,
            max_blocks=10,
            eos=(19,),
        )
        _ops.latent_step(**args)
        emit, nxt = int(args["emit_ids"]), args["next_embeds"][0]
        emitted.append(emit)
        fed.append(int(nxt[0]) if bool(args["use_hidden"]) else None)
        assert bool(args["use_hidden"]) or torch.equal(nxt, table[emit])
    return emitted, fed


def test_oracle_13_monet_vllm_state_machine():
    # REFERENCE.md oracle 13 with LATENT_SIZE=3: a=1 S=3 x=10 y=11 z=12 b=2, E=4, pad=9.
    # The hidden state at step i is the one of the position processed then: h(a) at step 1.
    emitted, fed = _drive([1, 3, 10, 11, 12, 2], layout=1)
    assert emitted == [1, 3, 9, 9, 4, 2]  # a S x y E b, placeholders shown as the pad id
    assert fed == [None, 2, 3, 4, None, None]  # S <- h(a), x <- h(S), y <- h(x)
    emitted, fed = _drive([1, 3, 4, 2], layout=1)  # a, S, E: closes at E after one latent
    assert emitted == [1, 3, 4, 2]
    assert fed == [None, 2, None, None]


def test_sft_state_machine_forces_close_after_k():
    emitted, fed = _drive([1, 3, 10, 11, 12, 13, 2], layout=0)
    assert emitted == [1, 3, 9, 9, 9, 4, 2]  # S keeps its embedding, K=3 slots, END forced
    assert fed == [None, None, 3, 4, 5, None, None]  # slot 1 <- h(S), then the previous slot


def test_oracle_20_collapse_latent_spans():
    assert (
        collapse_latent_spans("a<abs_vis_token>xyz</abs_vis_token>b")
        == "a<abs_vis_token><latent></abs_vis_token>b"
    )
    assert collapse_latent_spans("no block") == "no block"


def test_render_latent_text():
    model, processor = decode_model("sft")
    i = ids_of(processor)
    text_ids = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    ids = text_ids + [i["S"], i["PAD"], i["PAD"], i["E"]] + text_ids + [i["S"], i["PAD"]]
    got = render_latent_text(ids, processor.tokenizer, i["PAD"], i["S"], i["E"])
    assert got == "red<abs_vis_token>⟨2 latents⟩</abs_vis_token>red<abs_vis_token>⟨1 latents⟩"


# ------------------------------------------------------------ generate() vs the oracle


# Qwen3-VL (DeepStack in the prefill) with one layout: the layouts differ only in the state
# machine, which the Qwen2.5-VL cases and the engine-vs-step-loop test cover.
@pytest.mark.parametrize(
    "layout, arch", [(layout, ARCHS[0]) for layout in LAYOUTS] + [("sft", ARCHS[1])]
)
def test_greedy_matches_no_cache_reference(layout, arch):
    model, processor = decode_model(layout, arch)
    ids = ids_of(processor)
    # START sampled at output index 1 (entering latent mode from a sampled START) and again at
    # 10; the prompt of input 2 ends with START.
    proc = force_at({1: ids["S"], 10: ids["S"]})
    items = latent_inputs(processor)
    out = generate(
        model, processor, items, max_new_tokens=16, logits_processor=proc, return_latents=True
    )
    for b, item in enumerate(items):
        want, want_latents = reference_decode(
            model,
            processor,
            item,
            max_new_tokens=16,
            latent_size=K,
            layout=layout,
            logits_processor=proc,
        )
        assert out.sequences[b].tolist() == want, f"input {b}"
        assert_latents_match(out.latents[b], out.latent_counts[b], want_latents)
        assert ids["S"] in want or item["text"].endswith(LATENT_START)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_of_mixed_lengths_equals_each_alone(layout):
    model, processor = decode_model(layout)
    ids = ids_of(processor)
    proc = force_at({2: ids["S"]})
    items = latent_inputs(processor)
    batch = generate(
        model,
        processor,
        items,
        max_new_tokens=14,
        logits_processor=proc,
        return_latents=True,
        check_every=3,
    )
    for b, item in enumerate(items):
        alone = generate(
            model, processor, [item], max_new_tokens=14, logits_processor=proc, return_latents=True
        )
        assert batch.sequences[b].tolist() == alone.sequences[0].tolist(), f"input {b}"
        assert batch.latent_counts[b] == alone.latent_counts[0]
        # Left padding changes the attention's summation order: 1.4e-5 measured (torch 2.13
        # CPU), 1e-4 as for the no-cache oracle.
        torch.testing.assert_close(batch.latents[b], alone.latents[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_matches_python_step_loop(layout, arch):
    model, processor = decode_model(layout, arch)
    ids = ids_of(processor)
    proc = force_at({1: ids["S"], 9: ids["S"]})
    items = latent_inputs(processor)
    kwargs = dict(max_new_tokens=15, logits_processor=proc, return_latents=True)
    ours = generate(model, processor, items, **kwargs)
    loop = generate_python_loop(model, processor, items, **kwargs)
    assert [s.tolist() for s in ours.sequences] == [s.tolist() for s in loop.sequences]
    assert ours.latent_counts == loop.latent_counts
    for a, b in zip(ours.latents, loop.latents):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_forced_close_after_exactly_k(layout, k):
    model, processor = decode_model(layout)
    ids = ids_of(processor)
    # latent_size overrides the saved K (3) per call.
    out = generate(
        model,
        processor,
        image_inputs(1),
        max_new_tokens=12,
        latent_size=k,
        logits_processor=force_at({0: ids["S"]}),
        return_latents=True,
    )
    seq = out.sequences[0].tolist()
    n_slots = k if layout == "sft" else k - 1  # monet_vllm: START's own row is latent 1
    assert seq[: n_slots + 2] == [ids["S"]] + [ids["PAD"]] * n_slots + [ids["E"]]
    assert out.latent_counts[0][0] == k
    assert out.latents[0].shape == (1, k, model.config.text_config.hidden_size)
    if layout == "sft":
        # Inside an sft block nothing is sampled: forcing END there changes nothing.
        again = generate(
            model,
            processor,
            image_inputs(1),
            max_new_tokens=12,
            latent_size=k,
            logits_processor=force_at({0: ids["S"], 1: ids["E"]}),
        )
        assert again.sequences[0].tolist() == seq


def test_monet_vllm_sampled_end_closes_early():
    model, processor = decode_model("monet_vllm")
    ids = ids_of(processor)
    proc = force_at({1: ids["S"], 3: ids["E"]})
    item = image_inputs(1)[0]
    out = generate(
        model, processor, [item], max_new_tokens=10, logits_processor=proc, return_latents=True
    )
    seq = out.sequences[0].tolist()
    assert seq[1:4] == [ids["S"], ids["PAD"], ids["E"]]  # S, one placeholder, sampled END
    assert out.latent_counts[0] == [2]  # S <- h(prev), placeholder <- h(S); K=3 not reached
    want, want_latents = reference_decode(
        model,
        processor,
        item,
        max_new_tokens=10,
        latent_size=K,
        layout="monet_vllm",
        logits_processor=proc,
    )
    assert seq == want
    assert_latents_match(out.latents[0], out.latent_counts[0], want_latents)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_latent_block_cap(layout):
    model, processor = decode_model(layout)
    ids = ids_of(processor)

    def always_start(logits, index):
        logits[:, ids["S"]] += 1e6  # a bonus: the cap's -inf still wins
        return logits

    out = generate(
        model,
        processor,
        image_inputs(2),
        max_new_tokens=20,
        max_latent_blocks=2,
        logits_processor=always_start,
        return_latents=True,
    )
    for seq, counts in zip(out.sequences, out.latent_counts):
        assert seq.tolist().count(ids["S"]) == 2
        assert counts == [K, K]
    item = image_inputs(1)[0]
    want, _ = reference_decode(
        model,
        processor,
        item,
        max_new_tokens=20,
        latent_size=K,
        layout=layout,
        logits_processor=always_start,
        max_blocks=2,
    )
    assert out.sequences[0].tolist() == want


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eos_stops_each_sequence(layout):
    model, processor = decode_model(layout)
    ids = ids_of(processor)
    items = image_inputs(3)

    def eos_for_row0(logits, index):
        if logits.shape[0] == 3:  # only in the batch: row 0 stops at output index 4
            logits[0, ids["EOS"]] += 1e6 * (index[0] == 4).to(logits.dtype)  # graph-safe
        return logits

    out = generate(model, processor, items, max_new_tokens=9, logits_processor=eos_for_row0)
    assert out.sequences[0].tolist()[-1] == ids["EOS"] and len(out.sequences[0]) == 5
    assert out.finish_reasons[0] == "eos"
    assert IM_END not in out.texts[0]
    for b in (1, 2):
        alone = generate(model, processor, [items[b]], max_new_tokens=9)
        assert out.sequences[b].tolist() == alone.sequences[0].tolist()
    if layout == "monet_vllm":
        # EOS sampled as a placeholder inside a block stops too (vLLM stops on the sampled id).
        out = generate(
            model,
            processor,
            items[:1],
            max_new_tokens=9,
            logits_processor=force_at({1: ids["S"], 2: ids["EOS"]}),
        )
        assert out.sequences[0].tolist()[1:] == [ids["S"], ids["EOS"]]


def test_stop_strings_and_max_new_tokens():
    model, processor = decode_model("sft")
    items = image_inputs(2)
    full = generate(model, processor, items, max_new_tokens=12)
    assert [len(s) for s in full.sequences] == [12, 12]
    assert full.finish_reasons == ["length", "length"]
    tok = processor.tokenizer
    seq = full.sequences[0].tolist()
    stop = tok.decode(seq[5:7])
    cut = next(i for i in range(1, 13) if stop in tok.decode(seq[:i]))
    out = generate(model, processor, items, max_new_tokens=12, stop_strings=[stop], check_every=4)
    assert out.sequences[0].tolist() == seq[:cut]
    assert out.finish_reasons[0] == "stop"
    if stop not in tok.decode(full.sequences[1].tolist()):
        assert out.sequences[1].tolist() == full.sequences[1].tolist()


# ------------------------------------------------------------------------ HF generate


def _hf_greedy(model, processor, texts, images, max_new_tokens, **kwargs) -> list[list[int]]:
    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_decoding_equals_hf_generate(arch):
    # Qwen3-VL with images: the engine's own layer loop must add DeepStack as HF does.
    model, processor = decode_model("sft", arch)
    start = ids_of(processor)["S"]
    texts = [text_prompt(processor, q) for q in ("What is the color?", "Count the dots, please.")]
    ours = generate(model, processor, texts, max_new_tokens=12)
    # Without a latent block the engine is plain greedy decoding: HF must agree token for token.
    assert all(start not in s.tolist() for s in ours.sequences)
    assert [s.tolist() for s in ours.sequences] == _hf_greedy(model, processor, texts, None, 12)
    for text in texts:  # alone too
        assert (
            generate(model, processor, [text], max_new_tokens=12).sequences[0].tolist()
            == (_hf_greedy(model, processor, [text], None, 12)[0])
        )
    # With images (HF gets mm_token_type_ids from the processor, so it uses mRoPE); START is
    # suppressed on both sides so that no block is entered.
    items = image_inputs(3)
    first: list[torch.Tensor] = []

    def record(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not first:
            first.append(logits.clone())
        return logits

    ours = generate(
        model, processor, items, max_new_tokens=10, max_latent_blocks=0, logits_processor=record
    )
    texts = [i["text"] for i in items]
    images = [img for i in items for img in i["images"]]
    hf = _hf_greedy(model, processor, texts, images, 10, suppress_tokens=[start])
    assert [s.tolist() for s in ours.sequences] == hf
    # The prefill's last logits against one stock forward: tokens alone can agree by chance
    # when a visual input is dropped (measured for DeepStack), logits do not.
    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    with torch.no_grad():
        want = model(**enc).logits[:, -1].float()
    want[:, start] = float("-inf")  # the engine masks START at its block cap
    finite = torch.isfinite(want)
    torch.testing.assert_close(first[0][finite], want[finite], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ sampling, bad inputs


def test_sampling_is_reproducible_with_a_seed():
    model, processor = decode_model("monet_vllm")
    items = image_inputs(2)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9)
    a = generate(model, processor, items, seed=1, **kw)
    b = generate(model, processor, items, seed=1, **kw)
    c = generate(model, processor, items, seed=2, **kw)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    assert [s.tolist() for s in a.sequences] != [s.tolist() for s in c.sequences]
    with pytest.raises(ValueError, match="temperature"):
        generate(model, processor, items, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, processor, items, max_new_tokens=2, do_sample=True, top_p=1.5)


def test_bad_inputs_give_clear_errors(tmp_path):
    model, processor = decode_model("sft")
    item = image_inputs(1)[0]
    with pytest.raises(ValueError, match="latent_size must be an int >= 1, got 0"):
        generate(model, processor, [item], max_new_tokens=2, latent_size=0)
    with pytest.raises(ValueError, match="latent_size must be an int >= 1, got -2"):
        generate(model, processor, [item], max_new_tokens=2, latent_size=-2)
    with pytest.raises(ValueError, match="latent_layout"):
        generate(model, processor, [item], max_new_tokens=2, latent_layout="vllm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate(
            model,
            processor,
            [{"text": item["text"], "images": [tmp_path / "x.png"]}],
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="unknown image"):
        generate(model, processor, [{"text": item["text"], "images": [123]}], max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape("1 <|image_pad|> placeholder")):
        generate(model, processor, [{"text": item["text"]}], max_new_tokens=2)
    with pytest.raises(ValueError, match="input 1: empty prompt"):
        generate(model, processor, [item, {"text": "  "}], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, processor, [LATENT_START], max_new_tokens=2)
    with pytest.raises(ValueError, match="inputs is empty"):
        generate(model, processor, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, processor, [item], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_latent_blocks=0"):
        generate(
            model,
            processor,
            [item["text"].replace("<|image_pad|>", "") + LATENT_START],
            max_new_tokens=2,
            max_latent_blocks=0,
        )
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "nope.png"}, {"type": "text", "text": "hi"}],
        }
    ]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        generate(model, processor, [conversation], max_new_tokens=2)


def test_chat_conversation_input(tmp_path):
    from PIL import Image

    model, processor = decode_model("sft")
    path = tmp_path / "img.png"
    Image.new("RGB", (56, 56), (10, 200, 30)).save(path)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(path)},
                {"type": "text", "text": "What color?"},
            ],
        }
    ]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    a = generate(model, processor, [conversation], max_new_tokens=6)
    b = generate(model, processor, [{"text": text, "images": [Image.open(path)]}], max_new_tokens=6)
    assert a.sequences[0].tolist() == b.sequences[0].tolist()


# --------------------------------------------------------------------------------- CLI


def test_cli_generate_streams_text_and_latent_blocks(tmp_path, capsys):
    from PIL import Image

    from monet_fast.cli import main
    from monet_fast.model.loading import save_pretrained

    model, processor = decode_model("sft")
    save_pretrained(model, processor, tmp_path / "model")
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    argv = [
        "generate",
        "--model",
        str(tmp_path / "model"),
        "--image",
        str(image),
        "--prompt",
        "What color is it?",
        "--max-new-tokens",
        "8",
        "--start-latent",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{LATENT_START}⟨{K} latents⟩{LATENT_END}")
    assert "[8 tokens, " in captured.err and "of K=3 (sft)" in captured.err
    assert main(argv + ["--latent-size", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{LATENT_START}⟨2 latents⟩{LATENT_END}")

    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "model"),
                "--image",
                str(tmp_path / "missing.png"),
                "--prompt",
                "x",
            ]
        )
        == 2
    )
    assert "missing.png" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_latent_step_matches_torch(layout):
    # Without the CUDA kernel _ops.latent_step takes the torch fallback: it would compare with itself.
    info = _ops._ext().build_info()
    assert info["cuda"], f"monet_fast._C has no CUDA kernels: {info.get('cuda_reason')}"
    gen = torch.Generator().manual_seed(0)
    batch, hidden, vocab = 37, 300, 12
    lay = _ops.LAYOUT_IDS[layout]
    for dtype in (torch.float32, torch.bfloat16):
        table = torch.randn(vocab, hidden, generator=gen).to("cuda", dtype)
        for _ in range(20):
            state = [t.cuda() for t in _random_state(batch, gen)]
            state_ref = [t.clone() for t in state]
            sampled = torch.randint(0, vocab, (batch,), generator=gen).cuda()
            h = torch.randn(batch, hidden, generator=gen).to("cuda", dtype)
            got = _run_latent_step(_ops.latent_step, sampled, h, table, state, lay)
            want = _run_latent_step(_ops.latent_step_torch, sampled, h, table, state_ref, lay)
            for a, b in zip(state + got, state_ref + want):
                assert torch.equal(a, b)
