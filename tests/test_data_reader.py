"""Monet-SFT reader/writer, validation errors and the token-budget resize (REFERENCE.md §1.2-1.4,
oracles 5 and 21), on hand-written fixtures in the reference's on-disk format."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from monet_fast.data import (
    DEFAULT_SYSTEM,
    DataError,
    DataWarning,
    Sample,
    Segment,
    make_samples,
    read_monet_sft,
    read_monet_sft_with_report,
    resize_by_token_budget,
    validate,
    validate_sample,
    write_monet_sft,
    write_synthetic_dataset,
)
from monet_fast.model.tokens import LATENT_PLACEHOLDER as PH

RED, BLUE = (200, 30, 30), (30, 30, 200)


# ------------------------------------------------------------------------------------- helpers


def _png(path: Path, color=RED, size=(32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _img(path: str) -> dict:
    return {"type": "image", "image": path}


def _row(user=None, assistant=None, sample_id=123, dataset_name="Visual_CoT") -> dict:
    """The illustrative row of REFERENCE.md §1.2, pieces replaceable."""
    if user is None:
        user = [
            _img("Visual_CoT/images/q.png"),
            _text("What does the sign say?\nPut your final answer within \\boxed{}."),
        ]
    if assistant is None:
        assistant = [
            _text(f"Step 1: zoom in on the sign. {PH}"),
            _img("Visual_CoT/crops/c.png"),
            _text(
                "<observation>The sign reads STOP.</observation> So the answer is \\boxed{STOP}."
            ),
        ]
    return {
        "data": [
            {"role": "system", "content": [_text("<overwritten>")]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "metadata": {"dataset_name": dataset_name, "sample_id": sample_id},
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A Monet-SFT-125K-like folder: images relative to it, train.json one level down."""
    _png(tmp_path / "Visual_CoT/images/q.png", RED, (40, 30))
    _png(tmp_path / "Visual_CoT/crops/c.png", BLUE, (16, 16))
    _png(tmp_path / "Zebra_CoT_count/images/q.png", RED, (20, 20))
    return tmp_path


def _write(root: Path, rows, name="Visual_CoT/train.json") -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _kinds(segments) -> list[tuple[str, str]]:
    return [(s.kind, s.text) for s in segments]


def _assert_same_sample(a: Sample, b: Sample) -> None:
    """Same segments (images compared by pixels), answer, identity and metadata."""
    for seg_a, seg_b in zip(a.question + a.reasoning, b.question + b.reasoning, strict=True):
        assert (seg_a.kind, seg_a.text) == (seg_b.kind, seg_b.text)
        if seg_a.kind in ("image", "aux_image"):
            img_a, img_b = seg_a.load_image(), seg_b.load_image()
            assert (img_a.mode, img_a.size) == (img_b.mode, img_b.size)
            assert img_a.tobytes() == img_b.tobytes()
    assert (a.answer, a.key, a.system, a.choices, a.category, a.meta) == (
        b.answer,
        b.key,
        b.system,
        b.choices,
        b.category,
        b.meta,
    )


# -------------------------------------------------------------------------------- conversion


def test_reads_reference_row_into_segments(root):
    path = _write(root, [_row()])
    (sample,) = read_monet_sft(path, dataset_root=root)

    assert _kinds(sample.question) == [("image", ""), ("text", "What does the sign say?")]
    assert _kinds(sample.reasoning) == [
        ("text", "Step 1: zoom in on the sign. "),
        ("aux_image", ""),
        ("observation", "The sign reads STOP."),
        ("text", " So the answer is "),
        ("answer", "\\boxed{STOP}"),
        ("text", "."),
    ]
    assert sample.answer == "STOP"
    assert sample.system == DEFAULT_SYSTEM  # "<overwritten>" replaced, as the reference does
    assert (sample.dataset_name, sample.sample_id, sample.key) == (
        "Visual_CoT",
        "123",
        "Visual_CoT_123",
    )
    assert sample.source == f"{path}:0"
    q_img, aux_img = sample.question_images[0], sample.aux_images[0]
    assert q_img.mode == "RGB" and q_img.size == (40, 30) and q_img.getpixel((0, 0)) == RED
    assert aux_img.size == (16, 16) and aux_img.getpixel((3, 3)) == BLUE
    assert sample.reasoning[1].path == str(root / "Visual_CoT/crops/c.png")


def test_reference_preprocess_rules(root):
    # Oracle 21: tags before the first assistant image are stripped (text kept); placeholder in
    # the middle of a text item puts the image there; nested braces in \boxed{}.
    assistant = [
        _text(f"Look <observation>at the sign</observation> here {PH} then"),
        _img("Visual_CoT/crops/c.png"),
        _text(" more.<observation>It is 1/2.</observation> Answer: \\boxed{\\frac{1}{2}}"),
    ]
    path = _write(root, [_row(assistant=assistant)])
    (sample,) = read_monet_sft(path, dataset_root=root)
    assert _kinds(sample.reasoning) == [
        ("text", "Look at the sign here "),
        ("aux_image", ""),
        ("text", " then more."),
        ("observation", "It is 1/2."),
        ("text", " Answer: "),
        ("answer", "\\boxed{\\frac{1}{2}}"),
    ]
    assert sample.answer == "\\frac{1}{2}"


def test_boxed_instruction_kept_for_zebra_and_on_request(root):
    instruction = "\nPut your final answer within \\boxed{}."
    zebra_user = [_img("Zebra_CoT_count/images/q.png"), _text("How many?" + instruction)]
    path = _write(root, [_row(user=zebra_user), _row()])
    zebra, plain = read_monet_sft(path, dataset_root=root)
    assert zebra.question[1].text == "How many?" + instruction
    assert plain.question[1].text == "What does the sign say?"
    (kept,) = read_monet_sft(_write(root, [_row()]), root, strip_boxed_instruction=False)
    assert kept.question[1].text.endswith(instruction)


def test_answer_fallback_without_boxed(root):
    assistant = [
        _text(f"Zoom. {PH}"),
        _img("Visual_CoT/crops/c.png"),
        _text("<observation>A red hat.</observation> He wears a red hat. "),
    ]
    (sample,) = read_monet_sft(_write(root, [_row(assistant=assistant)]), root)
    assert (
        sample.reasoning[-1].kind == "answer"
        and sample.reasoning[-1].text == " He wears a red hat. "
    )
    assert sample.answer == "He wears a red hat."
    # Ending on an observation: it stays an observation and carries the answer.
    assistant[-1] = _text("<observation>A red hat.</observation>")
    (sample,) = read_monet_sft(_write(root, [_row(assistant=assistant)]), root)
    assert sample.reasoning[-1].kind == "observation" and sample.answer == "A red hat."


def test_no_observation_dropped_unless_allowed(root):
    assistant = [_text(f"Zoom. {PH}"), _img("Visual_CoT/crops/c.png"), _text("\\boxed{7}")]
    path = _write(root, [_row(assistant=assistant)])
    with pytest.raises(DataError, match="no observation"):
        read_monet_sft(path, root)
    (sample,) = read_monet_sft(path, root, allow_no_observation=True)
    assert sample.answer == "7"


def test_user_placeholder_moves_question_image(root):
    user = [_text(f"Look at {PH} and answer."), _img("Visual_CoT/images/q.png")]
    (sample,) = read_monet_sft(_write(root, [_row(user=user)]), root)
    assert _kinds(sample.question) == [
        ("text", "Look at "),
        ("image", ""),
        ("text", " and answer."),
    ]


def test_jsonl_and_lazy_images(root):
    path = root / "Visual_CoT/train.jsonl"
    path.write_text("\n".join(json.dumps(_row(sample_id=i)) for i in range(3)) + "\n")
    samples = read_monet_sft(path, root, load_images=False)
    assert [s.sample_id for s in samples] == ["0", "1", "2"]
    seg = samples[0].question[0]
    assert seg.image is None and seg.path == str(root / "Visual_CoT/images/q.png")
    assert seg.load_image().getpixel((0, 0)) == RED
    assert validate(samples) == samples
    os.remove(root / "Visual_CoT/crops/c.png")
    with pytest.raises(DataError) as err:
        validate(samples)
    assert "missing image file" in str(err.value) and "crops/c.png" in str(err.value)
    assert f"{path}, row 0" in str(err.value)


# ------------------------------------------------------------------------------------ errors


def _obs_before_image():
    return [
        _text(f"<observation>early</observation> {PH}"),
        _img("Visual_CoT/crops/c.png"),
        _text("<observation>o</observation> \\boxed{A}"),
    ]


ROW_ERRORS = [
    # (bad row, read options, expected message fragment)
    pytest.param([1, 2], {}, "row must be a JSON object", id="not-an-object"),
    pytest.param({"metadata": {"sample_id": 9}}, {}, 'row has no "data"', id="no-data"),
    pytest.param(
        _row(user=[_img("Visual_CoT/images/nope.png"), _text("Q")], sample_id=9),
        {},
        "missing image file",
        id="missing-image",
    ),
    pytest.param(
        _row(user=[{"type": "video", "video": "v.mp4"}, _text("Q")], sample_id=9),
        {},
        "unknown content item type 'video'",
        id="unknown-type",
    ),
    pytest.param(
        _row(assistant=_obs_before_image(), sample_id=9),
        {"strip_early_observations": False},
        "without a preceding auxiliary image",
        id="observation-without-aux",
    ),
    pytest.param(
        _row(
            assistant=[
                _text(f"z {PH}"),
                _img("Visual_CoT/crops/c.png"),
                _text("<observation>o</observation> \\boxed{ }"),
            ],
            sample_id=9,
        ),
        {},
        "empty answer",
        id="empty-answer",
    ),
    pytest.param(
        _row(
            assistant=[
                _text("no placeholder here"),
                _img("Visual_CoT/crops/c.png"),
                _text("<observation>o</observation> \\boxed{A}"),
            ],
            sample_id=9,
        ),
        {},
        "not immediately preceded by a text item containing",
        id="aux-without-placeholder",
    ),
    pytest.param(
        _row(
            assistant=[
                _text(f"z {PH}"),
                _img("Visual_CoT/crops/c.png"),
                _text(f"<observation>o</observation> again {PH} \\boxed{{A}}"),
            ],
            sample_id=9,
        ),
        {},
        "1 auxiliary images but 2",
        id="placeholder-count-mismatch",
    ),
    pytest.param(
        _row(
            assistant=[
                _text(f"z {PH}"),
                _img("Visual_CoT/crops/c.png"),
                _text("<observation>o \\boxed{A}"),
            ],
            sample_id=9,
        ),
        {},
        "unclosed '<observation>'",
        id="unclosed-observation",
    ),
]


@pytest.mark.parametrize("bad_row, options, fragment", ROW_ERRORS)
def test_row_errors_name_file_row_and_sample(root, bad_row, options, fragment):
    path = _write(root, [_row(sample_id=1), bad_row])
    with pytest.raises(DataError) as err:
        read_monet_sft(path, root, **options)
    message = str(err.value)
    assert fragment in message
    assert message.startswith(f"{path}, row 1")
    assert err.value.file == str(path) and err.value.row == 1
    copy = pickle.loads(pickle.dumps(err.value))  # DataLoader workers pickle exceptions
    assert (str(copy), copy.reason, copy.row) == (message, err.value.reason, 1)
    if isinstance(bad_row, dict) and "data" in bad_row:
        assert "sample_id='9'" in message
    if "missing" in fragment:
        assert "nope.png" in message


def test_malformed_json_names_file_line_and_column(root):
    path = root / "Visual_CoT/train.json"
    path.write_text('[\n  {"data": []},\n  {"data": [}\n]\n')
    with pytest.raises(DataError, match=r"malformed JSON at line 3 column \d+") as err:
        read_monet_sft(path, root, on_error="skip")  # a broken file cannot be skipped
    assert str(path) in str(err.value)
    jsonl = root / "Visual_CoT/train.jsonl"
    jsonl.write_text(json.dumps(_row()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"row 1: malformed JSON at line 2 column 2"):
        read_monet_sft(jsonl, root)


def test_missing_image_suggests_dataset_root(root):
    # Default root = the JSON's folder; Monet-SFT-125K paths are relative to its parent.
    with pytest.raises(DataError, match="pass dataset_root="):
        read_monet_sft(_write(root, [_row()]))


def test_skip_mode_counts_and_warns(root):
    rows = [_row(sample_id=0), [1], _row(sample_id=2), {"x": 1}, _row(sample_id=4)]
    path = _write(root, rows)
    with pytest.warns(DataWarning, match=r"skipped 2 of 5 rows \(row 1: row must be a JSON object"):
        samples = read_monet_sft(path, root, on_error="skip")
    assert [s.sample_id for s in samples] == ["0", "2", "4"]
    with pytest.warns(DataWarning):
        samples, report = read_monet_sft_with_report(path, root, on_error="skip")
    assert (report.n_rows, report.n_read, report.n_skipped) == (5, 3, 2)
    assert [row for row, _ in report.skipped] == [1, 3]
    with pytest.raises(ValueError, match="on_error must be one of"):
        read_monet_sft(path, root, on_error="ignore")


def test_validate_in_memory_samples():
    img = Image.new("RGB", (8, 8))
    good = Sample(
        question=[Segment("image", image=img), Segment("text", "Q?")],
        reasoning=[
            Segment("aux_image", image=img),
            Segment("observation", "o"),
            Segment("answer", "\\boxed{A}"),
        ],
        answer="A",
        sample_id="s1",
    )
    validate_sample(good)
    bad = Sample(
        question=good.question,
        reasoning=[Segment("observation", "o"), *good.reasoning],
        answer="A",
        sample_id="s2",
    )
    with pytest.raises(DataError, match="sample_id='s2': observation 'o' without a preceding"):
        validate_sample(bad)
    good.reasoning[1].kind = "video"  # bypassing Segment's own check
    with pytest.raises(DataError, match="unknown reasoning segment type 'video'"):
        validate_sample(good)
    with pytest.warns(DataWarning, match="skipped 2 invalid samples"):
        assert validate([good, bad], on_error="skip") == []


# ------------------------------------------------------------------------------------ writer


def test_synthetic_write_read_round_trip(tmp_path):
    samples = make_samples(4, seed=3)
    path = write_synthetic_dataset(tmp_path / "syn", 4, seed=3)
    assert path == tmp_path / "syn/train.json"
    rows = json.loads(path.read_text())
    assistant = rows[0]["data"][2]["content"]
    assert assistant[0]["text"].endswith(PH) and assistant[1]["image"].startswith("images/")
    assert assistant[2]["text"].startswith("<observation>")
    read = read_monet_sft(path)
    assert len(read) == 4
    for original, back in zip(samples, read, strict=True):
        _assert_same_sample(original, back)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_reference_row_write_read_round_trip(root, tmp_path):
    (sample,) = read_monet_sft(_write(root, [_row()]), root)
    path = write_monet_sft([sample], tmp_path / "out", name="copy.json")
    (back,) = read_monet_sft(path)
    _assert_same_sample(sample, back)
    # Rewriting replaces the file atomically (no temp files left behind).
    write_monet_sft([sample, sample], tmp_path / "out", name="copy.json")
    assert len(read_monet_sft(path)) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.json", "images"]


def test_writer_rejects_reserved_strings(tmp_path):
    (sample,) = make_samples(1)
    sample.reasoning[0].text += " <observation>"
    with pytest.raises(DataError, match="cannot write sample 0: .*reserved string '<observation>'"):
        write_monet_sft([sample], tmp_path)


# ----------------------------------------------------------------------------- resize (§1.4)


def test_resize_within_budget_is_unchanged():
    # Oracle 5, first half.
    img = Image.new("RGB", (100, 100))
    out, sizes = resize_by_token_budget([img], global_max_pixels=2000 * 28 * 28)
    assert sizes is None and out[0] is img


# (input sizes, global tokens, per-image tokens, expected sizes), worked by hand from §1.4.
RESIZE_CASES = [
    # Oracle 5: ratio sqrt(1176000/8e6) = 0.38341 -> int(766.8) = 766 -> 756; 756^2 <= per cap.
    ([(2000, 2000), (2000, 2000)], 1500, 1280, [(756, 756), (756, 756)]),
    # Per-image cap: ratio 0.41740 -> 1252 -> 1232; 1232^2 > 1003520 -> r 0.81312 -> 1001 -> 980.
    ([(3000, 3000)], 2000, 1280, [(980, 980)]),
    # Thin strip: ratio 0.31305 -> (1252, 6) -> (1232, 28) (min one tile); 34496 > 7840 ->
    # r 0.47673 -> (587, 13) -> (560, 28).
    ([(4000, 20)], 10, 10, [(560, 28)]),
]


@pytest.mark.parametrize("sizes, global_tokens, per_tokens, expected", RESIZE_CASES)
def test_resize_by_token_budget_oracle(sizes, global_tokens, per_tokens, expected):
    images = [Image.new("RGB", s, (10 * k, 0, 0)) for k, s in enumerate(sizes)]
    out, new_sizes = resize_by_token_budget(images, global_tokens * 784, per_tokens * 784)
    assert new_sizes == expected
    assert [im.size for im in out] == expected


def test_resize_uses_bicubic():
    img = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    out, _ = resize_by_token_budget([img], 28 * 28 * 20, 28 * 28 * 20)
    expected = img.resize(out[0].size, Image.Resampling.BICUBIC)
    assert out[0].tobytes() == expected.tobytes()
