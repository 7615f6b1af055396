"""Hostile data (issue 14.4): image paths confined to the dataset root, bad image files and bad
configs all give located errors (file, row, field), and the writer is all-or-nothing."""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from monet_fast.data import DataError, Sample, Segment, make_samples, read_monet_sft
from monet_fast.data.paths import resolve_image_path
from monet_fast.data.writer import write_monet_sft
from monet_fast.eval.readers import read_benchmark
from monet_fast.model.tokens import LATENT_PLACEHOLDER as PH
from monet_fast.train.config import ConfigError, DataSection, load_config

# ------------------------------------------------------------------------------------- helpers


def _png(path: Path, size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path, format="PNG")
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height but holds no pixel data (a bomb's header),
    padded with a text chunk (an HR-Bench image cell of <= 64 characters is a row reference)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = chunk(b"tEXt", b"Comment\x00" + b"x" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + text + chunk(b"IEND", b""))
    return path


def _row(question_image: str, aux_image: str = "crop.png", sample_id: int = 7) -> dict:
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": question_image},
                    {"type": "text", "text": "Q?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"look {PH}"},
                    {"type": "image", "image": aux_image},
                    {"type": "text", "text": "<observation>red</observation> \\boxed{A}"},
                ],
            },
        ],
        "metadata": {"dataset_name": "d", "sample_id": sample_id},
    }


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """root/ with q.png, crop.png and a secret image next to (outside) it."""
    root = tmp_path / "root"
    _png(root / "q.png")
    _png(root / "crop.png")
    _png(root / "sub" / "inner.png")
    _png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    return root


def _read(root: Path, question_image: str, **kw):
    path = root / "train.json"
    path.write_text(json.dumps([_row("q.png", sample_id=1), _row(question_image)]))
    return read_monet_sft(path, root, **kw), path


# ------------------------------------------------------------------------------ dataset root

ESCAPES = [
    pytest.param("ABS", id="absolute"),
    pytest.param("../secret.png", id="dotdot"),
    pytest.param("sub/../../secret.png", id="dotdot-inside-path"),
    pytest.param("link.png", id="symlink-file"),
    pytest.param("linkdir/secret.png", id="symlink-dir"),
]


@pytest.mark.parametrize("load_images", [True, False])
@pytest.mark.parametrize("image", ESCAPES)
def test_image_paths_may_not_escape_the_root(dataset, image, load_images):
    if image == "ABS":
        image = str(dataset.parent / "secret.png")
    with pytest.raises(DataError) as err:
        _read(dataset, image, load_images=load_images)
    e = err.value
    assert e.file == str(dataset / "train.json") and e.row == 1 and e.sample_id == "7"
    assert e.field == "data[1].content[0].image"
    assert image in str(e) and "allow_outside_root" in str(e)
    # The explicit opt-in reads the same row.
    samples, _ = _read(dataset, image, load_images=load_images, allow_outside_root=True)
    assert len(samples) == 2


def test_dotdot_that_stays_inside_the_root_is_fine(dataset):
    samples, _ = _read(dataset, "sub/../q.png")
    assert samples[1].question_images[0].size == (8, 6)


def test_aux_image_field_is_named(dataset):
    path = dataset / "train.json"
    path.write_text(json.dumps([_row("q.png", aux_image="../secret.png")]))
    with pytest.raises(DataError) as err:
        read_monet_sft(path, dataset)
    assert err.value.field == "data[2].content[1].image" and err.value.row == 0


@pytest.mark.parametrize(
    "bad, fragment",
    [("", "non-empty string"), ("a\x00b.png", "NUL"), ("\ud800.png", "not a valid file name")],
)
def test_unusable_path_strings(tmp_path, bad, fragment):
    with pytest.raises(DataError, match=fragment):
        resolve_image_path(tmp_path, bad, allow_outside_root=True)


def test_train_data_section_passes_allow_outside_root(dataset):
    from monet_fast.train.data import load_samples

    path = dataset / "train.json"
    path.write_text(json.dumps([_row("../secret.png")]))
    section = DataSection(kind="monet_sft", path=str(path), root=str(dataset))
    with pytest.raises(DataError, match="outside the dataset root"):
        load_samples(section)
    section.allow_outside_root = True
    samples, report = load_samples(section)
    assert report.n_samples == 1


def test_config_key_allow_outside_root(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "stage: 1\nmodel: {tiny_seed: 0}\n"
        "data: {kind: monet_sft, path: x.json, allow_outside_root: true}\n"
    )
    assert load_config(cfg_path).data.allow_outside_root is True
    with pytest.raises(
        ConfigError, match=r"c\.yaml: data\.allow_outside_root must be true or false"
    ):
        load_config(cfg_path, ["data.allow_outside_root=yes please"])


def test_rl_prompts_refuse_escaping_paths(dataset):
    from monet_fast.train.prompts import read_prompt_file

    path = dataset / "rl.jsonl"
    rows = [{"question": "q", "image": "q.png", "answer": "A"}]
    rows.append({"question": "q", "image": str(dataset.parent / "secret.png"), "answer": "A"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as err:
        read_prompt_file(str(path))
    assert (err.value.file, err.value.row, err.value.field) == (str(path), 1, "image")
    samples, _ = read_prompt_file(str(path), allow_outside_root=True)
    assert len(samples) == 2


def test_benchmark_readers_refuse_escaping_paths(dataset):
    vstar = dataset / "vstar"
    vstar.mkdir()
    text = "What colour?\n(A) red\n(B) blue\nAnswer with the letter."
    row = {"image": "../../secret.png", "text": text, "label": "A", "question_id": 0}
    (vstar / "test_questions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        read_benchmark("vstar", vstar)
    assert (err.value.row, err.value.field) == (0, "image")
    assert read_benchmark("vstar", vstar, allow_outside_root=True)[0].answer == "A"

    mme = dataset / "mme"
    mme.mkdir()
    question = {
        "Question_id": "p/x/0",
        "Image": "../link.png",
        "Text": "What colour?",
        "Answer choices": ["(A) red", "(B) blue"],
        "Ground truth": "A",
    }
    (mme / "MME-RealWorld-Lite.json").write_text(json.dumps([question]))
    with pytest.raises(DataError) as err:
        read_benchmark("mme-realworld-lite", mme)
    assert (err.value.row, err.value.field) == (0, "Image")

    # V* folder layout: the image is found next to its annotation; a symlink out is refused.
    folders = dataset / "vstar_folders"
    (folders / "direct_attributes").mkdir(parents=True)
    ann = {"question": "What colour?", "options": ["red", "blue"]}
    (folders / "direct_attributes" / "a.json").write_text(json.dumps(ann))
    (folders / "direct_attributes" / "a.png").symlink_to(dataset.parent / "secret.png")
    with pytest.raises(DataError, match="through a symlink"):
        read_benchmark("vstar", folders)
    assert len(read_benchmark("vstar", folders, allow_outside_root=True)) == 1


# ------------------------------------------------------------------------------ bad rows


def _spoil_user_text(row):
    row["data"][1]["content"][1]["text"] = 5


def _spoil_unicode(row):
    row["data"][2]["content"][2]["text"] = "\ud800 \\boxed{A}"


def _spoil_type(row):
    row["data"][2]["content"][0]["type"] = "video"


def _spoil_choices(row):
    row["metadata"]["choices"] = [1, 2]


@pytest.mark.parametrize(
    "spoil, field, fragment",
    [
        (_spoil_user_text, "data[1].content[1].text", "needs a string, got 5"),
        (_spoil_unicode, "data[2].content[2].text", "not valid unicode"),
        (_spoil_type, "data[2].content[0].type", "unknown content item type 'video'"),
        (_spoil_choices, "metadata.choices", "list of strings"),
    ],
)
def test_malformed_rows_name_the_field(dataset, spoil, field, fragment):
    row = _row("q.png")
    spoil(row)
    path = dataset / "train.json"
    path.write_text(json.dumps([_row("q.png", sample_id=1), row]))
    with pytest.raises(DataError) as err:
        read_monet_sft(path, dataset)
    assert (err.value.file, err.value.row, err.value.field) == (str(path), 1, field)
    assert fragment in str(err.value) and f"field {field}" in str(err.value)


# ------------------------------------------------------------------------------- bad images


def _truncated(path: Path) -> Path:
    _png(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_IMAGES = [
    pytest.param(lambda p: p.write_bytes(b"") or p, "empty (0 bytes)", id="zero-size"),
    pytest.param(_truncated, "does not decode", id="truncated"),
    pytest.param(
        lambda p: p.write_bytes(b"GIF89a not really") or p, "does not decode", id="corrupt"
    ),
    pytest.param(lambda p: _png(p, mode="I;16"), "mode 'I;16'", id="16-bit-mode"),
    # Over PIL's warning limit (89.5 Mpx): our check, header only, nothing decoded.
    pytest.param(lambda p: _png_header_only(p, 10_000, 10_000), "over the limit", id="bomb"),
    # Over twice the limit: PIL refuses at open; still a located DataError.
    pytest.param(lambda p: _png_header_only(p, 20_000, 20_000), "too large", id="huge-bomb"),
    pytest.param(lambda p: p.mkdir() or p, "does not decode", id="a-directory"),
]


@pytest.mark.parametrize("make, fragment", BAD_IMAGES)
def test_bad_image_files_are_located_errors(tmp_path, make, fragment):
    make(tmp_path / "bad.png")
    _png(tmp_path / "crop.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_row("bad.png")]))
    with pytest.raises(DataError) as err:
        read_monet_sft(path)
    e = err.value
    assert fragment in str(e), str(e)
    assert (e.file, e.row, e.sample_id, e.field) == (str(path), 0, "7", "data[1].content[0].image")
    assert "bad.png" in str(e)
    # Read lazily, the same file fails when the batch decodes it, naming row and image.
    (sample,) = read_monet_sft(path, load_images=False)
    with pytest.raises(DataError, match=re.escape(fragment)) as err:
        _ = sample.question_images
    assert (err.value.file, err.value.row, err.value.sample_id) == (str(path), 0, "7")


def test_pixel_limit_follows_pil_setting(tmp_path, monkeypatch):
    _png(tmp_path / "q.png", size=(40, 40))
    _png(tmp_path / "crop.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_row("q.png")]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="40x40 = 1600 pixels, over the limit of 1000"):
        read_monet_sft(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert read_monet_sft(path)[0].question_images[0].size == (40, 40)


def test_hrbench_base64_bomb_is_refused_from_its_header(tmp_path):
    import base64

    bomb = _png_header_only(tmp_path / "bomb.png", 10_000, 10_000).read_bytes()
    header = "index\tquestion\tA\tB\tanswer\tcategory\timage"
    row = f"0\tWhat?\tred\tblue\tA\tc\t{base64.b64encode(bomb).decode()}"
    (tmp_path / "hr_bench_4k.tsv").write_text(f"{header}\n{row}\n")
    with pytest.raises(DataError, match="row 0.*over the limit"):
        read_benchmark("hrbench4k", tmp_path)


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("stage: 1\nmodel: {tiny_seed: 0}\noptim: {lr: .nan}\n", [], "optim.lr must be a finite"),
        ("stage: 1\nmodel: {tiny_seed: 0}\n", ["optim.eps=1e999"], "optim.eps must be a finite"),
        ("stage: 1\nmodel: {tiny_seed: 0}\ndata: {nn: 3}\n", [], "unknown config key 'data.nn'"),
        ("stage: 1\nmodel: {tiny_seed: 0}\ndata: {n: '3'}\n", [], "data.n must be an integer"),
        ("- stage\n- 1\n", [], "must be a YAML mapping"),
        ("stage: [1\n", [], "not valid YAML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, overrides, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value)


def test_rl_config_errors_name_file_and_key(tmp_path):
    from monet_fast.train.vlpo_config import load_rl_config

    path = tmp_path / "rl.yaml"
    path.write_text("model: {tiny_seed: 0}\nrollout: {temperature: .inf}\n")
    with pytest.raises(ConfigError, match=r"rl\.yaml: rollout\.temperature must be a finite"):
        load_rl_config(path)
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rl_config(path)


# --------------------------------------------------------------------------- all-or-nothing


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_writer_writes_nothing_for_an_invalid_sample(tmp_path):
    samples = make_samples(3, 0)
    samples[2].question[-1] = Segment("text", f"sneaky {PH}")  # reserved string
    with pytest.raises(DataError, match="cannot write sample 2.*reserved string"):
        write_monet_sft(samples, tmp_path / "out")
    assert not (tmp_path / "out").exists() or _snapshot(tmp_path / "out") == {}


def test_writer_leaves_an_existing_dataset_unchanged_when_an_image_fails(tmp_path):
    out = tmp_path / "out"
    good = make_samples(3, 0)
    write_monet_sft(good, out)
    before = _snapshot(out)
    # Same names, different pixels, and sample 2's first image is a corrupt file on disk.
    newer = make_samples(3, 7)
    for s, old in zip(newer, good):
        s.sample_id, s.dataset_name = old.sample_id, old.dataset_name
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    newer[2].question[0] = Segment("image", path=str(corrupt))
    with pytest.raises(DataError, match="cannot write sample 2.*corrupt.png"):
        write_monet_sft(newer, out)
    assert _snapshot(out) == before  # no image replaced, no temp file left, same JSON
    assert not [p for p in out.rglob("*.tmp")]


def test_writer_output_is_read_back(tmp_path):
    samples = make_samples(2, 1)
    path = write_monet_sft(samples, tmp_path / "out")
    again = read_monet_sft(path)
    assert [s.answer for s in again] == [s.answer for s in samples]
    assert isinstance(again[0], Sample) and os.path.isfile(again[0].question[0].path or "")
