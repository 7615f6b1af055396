"""Benchmark readers on small fake copies of each published layout (tiny images, base64 where
the layout embeds them), and the DataError each malformed file or row raises."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from monet_fast.data.reader import DataError
from monet_fast.data.synthetic import write_synthetic_dataset
from monet_fast.eval.readers import (
    BENCHMARKS,
    MONET_EVAL_SYSTEM,
    EncodedImageSegment,
    read_benchmark,
)

HR_HEADER = [
    "index",
    "question",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "cycle_category",
    "image",
]


def save_image(path: Path, color=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def b64_png(color=(10, 200, 10), size=(5, 4)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    # csv's minimal quoting is what pandas' to_csv(sep="\t") writes.
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def vstar_row(qid=0, image="direct_attributes/sa_1.jpg", label="B", **kw) -> dict:
    row = {
        "image": image,
        "text": "What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
        "Answer with the option's letter from the given choices directly.",
        "category": "direct_attributes",
        "question_id": qid,
        "label": label,
    }
    row.update(kw)
    return row


@pytest.fixture
def vstar_dir(tmp_path) -> Path:
    root = tmp_path / "vstar_bench"
    save_image(root / "direct_attributes" / "sa_1.jpg")
    save_image(root / "relative_position" / "sa_2.jpg", color=(0, 0, 200))
    rows = [
        vstar_row(0),
        vstar_row(
            1,
            image="relative_position/sa_2.jpg",
            label="A",
            category="relative_position",
            text="Is the cup on the left or right of the dog?\n(A) left\n(B) right\n"
            "Answer with the option's letter from the given choices directly.",
        ),
    ]
    write_jsonl(root / "test_questions.jsonl", rows)
    return root


def hr_row(
    index: str, image: str, answer="C", question="What is written on the sign?"
) -> list[str]:
    return [index, question, "stop", "go", "yield", "exit", answer, "single", "1", image]


@pytest.fixture
def hr_dir(tmp_path) -> Path:
    root = tmp_path / "HR-Bench"
    root.mkdir()
    rows = [
        hr_row("0", b64_png()),
        # A quoted field with a tab and a newline, as pandas writes it.
        hr_row("1", b64_png((0, 0, 255)), answer="A", question="Line one\tand\nline two?"),
        # VLMEvalKit de-duplication: "0" points at row 0's image.
        hr_row("2", "0", answer="D"),
    ]
    write_tsv(root / "hr_bench_4k.tsv", HR_HEADER, rows)
    return root


def mme_entry(qid: str, image="img_1.png", truth="B", **kw) -> dict:
    entry = {
        "Question_id": qid,
        "Image": image,
        "Text": "What is the speed limit?",
        "Question Type": "Multiple Choice",
        "Answer choices": [
            "(A) 30",
            "(B) 50",
            "(C) 70",
            "(D) 90",
            "(E) The image does not feature the content.",
        ],
        "Ground truth": truth,
        "Category": "traffic_sign",
        "Subtask": "Autonomous_Driving",
        "Task": "Perception",
    }
    entry.update(kw)
    return entry


@pytest.fixture
def mme_dir(tmp_path) -> Path:
    root = tmp_path / "MME-RealWorld-Lite"
    save_image(root / "imgs" / "img_1.png")
    save_image(root / "img_2.png")  # found next to the JSON too
    entries = [
        mme_entry("perception/ad/0001"),
        mme_entry("perception/ad/0002", image="img_2.png", truth="E"),
    ]
    (root / "MME-RealWorld-Lite.json").write_text(json.dumps(entries), encoding="utf-8")
    return root


# ---- parsing ---------------------------------------------------------------------------------


def test_vstar_jsonl(vstar_dir):
    samples = read_benchmark("vstar", vstar_dir)
    assert [s.sample_id for s in samples] == ["0", "1"]
    first = samples[0]
    assert [seg.kind for seg in first.question] == ["image", "text"]
    assert first.question[1].text == (
        "What is the color of the cup?\nA. red\nB. blue\nC. green\nD. white"
    )
    assert first.choices == ["red", "blue", "green", "white"]
    assert first.answer == "B" and first.category == "direct_attributes"
    assert first.source == f"{vstar_dir / 'test_questions.jsonl'}:0"
    assert first.system == MONET_EVAL_SYSTEM and first.dataset_name == "vstar"
    assert first.meta["instruction"].startswith("Answer with the option's letter")
    assert first.question[0].image is None  # lazy by default
    assert first.question_images[0].size == (8, 6)
    assert samples[1].choices == ["left", "right"] and samples[1].answer == "A"
    # The file itself may be given, and limit takes the first rows.
    assert len(read_benchmark("vstar", vstar_dir / "test_questions.jsonl", limit=1)) == 1
    assert read_benchmark("vstar", vstar_dir, limit=0) == []
    loaded = read_benchmark("vstar", vstar_dir, load_images=True, system="S")
    assert loaded[0].question[0].image is not None and loaded[0].system == "S"


def test_vstar_per_category_folders(tmp_path):
    root = tmp_path / "vstar"
    annotated = {"sa_1": ["rubber", "cotton", "leather", "wool"], "sa_2": ["left", "right"]}
    for name, options in annotated.items():
        save_image(root / "direct_attributes" / f"{name}.jpg")
        ann = {
            "target_object": ["glove"],
            "bbox": [[1, 2, 3, 4]],
            "question": f"Q {name}?",
            "options": options,
        }
        (root / "direct_attributes" / f"{name}.json").write_text(json.dumps(ann))
    samples = read_benchmark("vstar", root)
    assert [s.sample_id for s in samples] == ["direct_attributes/sa_1", "direct_attributes/sa_2"]
    for sample, options in zip(samples, annotated.values()):
        # options[0] is the correct one wherever the deterministic shuffle put it.
        assert sample.choices[ord(sample.answer) - ord("A")] == options[0]
        assert sorted(sample.choices) == sorted(options)
        assert sample.question[1].text.startswith(f"Q {sample.sample_id[-4:]}?\nA. ")
    assert samples[0].meta["target_object"] == ["glove"]
    again = read_benchmark("vstar", root)
    assert [s.choices for s in again] == [s.choices for s in samples]  # deterministic


def test_hrbench_tsv(hr_dir):
    samples = read_benchmark("hrbench4k", hr_dir)
    assert [s.sample_id for s in samples] == ["0", "1", "2"]
    first = samples[0]
    assert first.choices == ["stop", "go", "yield", "exit"] and first.answer == "C"
    assert first.category == "single" and first.meta["cycle_category"] == "1"
    assert first.source == f"{hr_dir / 'hr_bench_4k.tsv'}:0"
    assert isinstance(first.question[0], EncodedImageSegment)
    assert first.question_images[0].size == (5, 4)
    assert samples[1].question[1].text.startswith("Line one\tand\nline two?\nA. stop")
    assert samples[1].question_images[0].getpixel((0, 0)) == (0, 0, 255)
    # Row 2 reuses row 0's image by index (VLMEvalKit de-duplication).
    assert samples[2].question_images[0].getpixel((0, 0)) == (10, 200, 10)
    loaded = read_benchmark("hrbench4k", hr_dir, load_images=True)
    assert loaded[0].question[0].image is not None


def test_hrbench_image_reference_past_limit(tmp_path):
    rows = [hr_row("5", "7"), hr_row("6", b64_png()), hr_row("7", b64_png((1, 2, 3)))]
    write_tsv(tmp_path / "hr_bench_8k.tsv", HR_HEADER, rows)
    (sample,) = read_benchmark("hrbench8k", tmp_path, limit=1)
    assert sample.question_images[0].getpixel((0, 0)) == (1, 2, 3)


def test_mme_realworld_lite_json(mme_dir):
    samples = read_benchmark("mme-realworld-lite", mme_dir)
    first, second = samples
    assert first.sample_id == "perception/ad/0001"
    assert first.choices[:2] == ["30", "50"] and len(first.choices) == 5
    assert first.answer == "B" and first.category == "Perception/Autonomous_Driving"
    assert first.meta["Category"] == "traffic_sign"
    assert Path(first.question[0].path) == mme_dir / "imgs" / "img_1.png"
    assert Path(second.question[0].path) == mme_dir / "img_2.png" and second.answer == "E"
    # The data.zip layout with a top-level data/ folder is found too.
    nested = mme_dir.parent / "unzipped"
    (nested / "data").mkdir(parents=True)
    (mme_dir / "MME-RealWorld-Lite.json").rename(nested / "data" / "MME-RealWorld-Lite.json")
    (mme_dir / "imgs").rename(nested / "data" / "imgs")
    (sample,) = read_benchmark("mme-realworld-lite", nested, limit=1)
    assert sample.sample_id == "perception/ad/0001"


def test_mme_realworld_lite_tsv(tmp_path):
    header = [
        "index",
        "question",
        "multi-choice options",
        "answer",
        "category",
        "l2-category",
        "image",
    ]
    options = str(
        ["(A) 30", "(B) 50", "(C) 70", "(D) 90", "(E) The image does not feature the content."]
    )
    write_tsv(
        tmp_path / "mme_realworld_lite.tsv",
        header,
        [["3993", "Speed?", options, "C", "Perception", "ad", b64_png()]],
    )
    (sample,) = read_benchmark("mme-realworld-lite", tmp_path)
    assert sample.sample_id == "3993" and sample.answer == "C" and sample.choices[2] == "70"
    assert sample.meta["l2_category"] == "ad" and sample.question_images[0].size == (5, 4)


def test_synthetic(tmp_path):
    write_synthetic_dataset(tmp_path / "syn", 3, seed=1)
    samples = read_benchmark("synthetic", tmp_path / "syn", limit=2)
    assert len(samples) == 2
    assert samples[0].choices and samples[0].answer in "ABCD"
    assert samples[0].question[1].text.splitlines()[1].startswith("A. ")
    assert samples[0].system != MONET_EVAL_SYSTEM  # the training system prompt is kept
    assert read_benchmark("synthetic", tmp_path / "syn", system="S")[0].system == "S"


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_benchmark_and_bad_limit(tmp_path):
    with pytest.raises(ValueError, match="benchmark must be one of"):
        read_benchmark("mmbench", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        read_benchmark("vstar", tmp_path, limit=-1)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vstar", "test_questions.jsonl"),
        ("hrbench4k", "hr_bench_4k.tsv"),
        ("hrbench8k", "hr_bench_8k.tsv"),
        ("mme-realworld-lite", "MME-RealWorld-Lite.json"),
        ("synthetic", "train.json"),
    ],
)
def test_missing_files_name_the_expected_layout(tmp_path, name, expected):
    assert name in BENCHMARKS
    with pytest.raises(DataError, match=expected) as info:
        read_benchmark(name, tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        read_benchmark(name, tmp_path / "nowhere")


def _vstar_error(root: Path, rows: list) -> str:
    write_jsonl(root / "test_questions.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_benchmark("vstar", root)
    return str(info.value)


def test_vstar_row_errors(vstar_dir):
    path = str(vstar_dir / "test_questions.jsonl")
    msg = _vstar_error(
        vstar_dir, [vstar_row(0), vstar_row(1, image="direct_attributes/missing.jpg")]
    )
    assert path in msg and "row 1" in msg and "missing.jpg" in msg and "sample_id='1'" in msg
    msg = _vstar_error(vstar_dir, [vstar_row(0, label="E")])
    assert "row 0" in msg and "option letters" in msg
    msg = _vstar_error(vstar_dir, [vstar_row(0, text="What colour? no options")])
    assert "no '(A) ...' option lines" in msg
    msg = _vstar_error(vstar_dir, [vstar_row(0, text="Q?\n(A) x\n(C) y")])
    assert "(B) text" in msg
    msg = _vstar_error(vstar_dir, [{"image": "x.jpg"}])
    assert "missing key(s)" in msg and "label" in msg
    msg = _vstar_error(vstar_dir, [vstar_row(0), vstar_row(0)])
    assert "duplicate sample_id '0'" in msg
    (vstar_dir / "test_questions.jsonl").write_text(json.dumps(vstar_row(0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"row 1: malformed JSON at line 2"):
        read_benchmark("vstar", vstar_dir)


def test_vstar_folder_errors(tmp_path):
    root = tmp_path / "vstar"
    (root / "direct_attributes").mkdir(parents=True)
    with pytest.raises(DataError, match="no <name>.json annotation files"):
        read_benchmark("vstar", root)
    (root / "direct_attributes" / "sa_1.json").write_text(
        json.dumps({"question": "Q?", "options": ["a", "b"]})
    )
    with pytest.raises(DataError, match=r"sa_1\.json.*no image next to the annotation"):
        read_benchmark("vstar", root)


def _hr_error(root: Path, rows: list[list[str]], header=HR_HEADER) -> str:
    write_tsv(root / "hr_bench_4k.tsv", header, rows)
    with pytest.raises(DataError) as info:
        read_benchmark("hrbench4k", root)
    assert str(root / "hr_bench_4k.tsv") in str(info.value)
    return str(info.value)


def test_hrbench_errors(tmp_path):
    good = hr_row("0", b64_png())
    assert "missing column(s) ['answer']" in _hr_error(
        tmp_path, [good[:6] + good[7:]], [c for c in HR_HEADER if c != "answer"]
    )
    msg = _hr_error(tmp_path, [good, hr_row("1", "@@@ not base64 " * 8)])
    assert "row 1" in msg and "not valid base64" in msg
    not_image = base64.b64encode(b"plain text, not an image file" * 4).decode()
    assert "does not decode to an image" in _hr_error(tmp_path, [hr_row("0", not_image)])
    assert "neither base64 nor the index" in _hr_error(tmp_path, [hr_row("0", "42")])
    assert "fields but the header has" in _hr_error(tmp_path, [good[:-1]])
    assert "option letters" in _hr_error(tmp_path, [hr_row("0", b64_png(), answer="E")])
    gap = hr_row("0", b64_png())
    gap[4] = ""  # C empty, D filled
    assert "without gaps" in _hr_error(tmp_path, [gap])
    assert "duplicate sample_id" in _hr_error(tmp_path, [good, good])
    (tmp_path / "hr_bench_4k.tsv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_benchmark("hrbench4k", tmp_path)


def test_hrbench_parquet_needs_pyarrow(tmp_path):
    # The parquet copy is read only with pyarrow installed (not a dependency); without it the
    # error says so and points at the .tsv copy.
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "hr_bench_4k.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"hr_bench_4k\.parquet.*needs pyarrow"):
            read_benchmark("hrbench4k", tmp_path)
    else:  # pragma: no cover - pyarrow is not part of the test environment
        pytest.skip("pyarrow installed: the missing-dependency message cannot be shown")


def test_mme_errors(mme_dir):
    path = mme_dir / "MME-RealWorld-Lite.json"

    def error(entries) -> str:
        path.write_text(json.dumps(entries))
        with pytest.raises(DataError) as info:
            read_benchmark("mme-realworld-lite", mme_dir)
        assert str(path) in str(info.value)
        return str(info.value)

    assert "row 1" in error([mme_entry("a"), mme_entry("b", image="nope.png")])
    assert "imgs/nope.png" in error([mme_entry("b", image="nope.png")])
    assert "(B) text" in error([mme_entry("a", **{"Answer choices": ["(A) 1", "2"]})])
    assert "missing key(s) ['Ground truth']" in error(
        [{k: v for k, v in mme_entry("a").items() if k != "Ground truth"}]
    )
    assert "option letters" in error([mme_entry("a", truth="F")])
    assert "expected a JSON list" in error({"Question_id": "a"})
    path.write_text("[{")
    with pytest.raises(DataError, match="malformed JSON at line 1"):
        read_benchmark("mme-realworld-lite", mme_dir)


def test_oversized_image_is_a_located_error(vstar_dir, monkeypatch):
    # PIL's decompression-bomb guard raises its own error type; it must still name file and row.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"test_questions\.jsonl, row 0.*MAX_IMAGE_PIXELS"):
        read_benchmark("vstar", vstar_dir, load_images=True)


def test_mme_tsv_bad_options(tmp_path):
    header = ["index", "question", "multi-choice options", "answer", "category", "image"]
    write_tsv(
        tmp_path / "MME-RealWorld-Lite.tsv",
        header,
        [["1", "Q?", "['(A) 1', ", "A", "c", b64_png()]],
    )
    with pytest.raises(DataError, match=r"row 0.*not a list literal"):
        read_benchmark("mme-realworld-lite", tmp_path)
