"""The synthetic "find the small object" task: determinism, independence from n, answer
consistency, the target being what the crop shows, and the task's unambiguity."""

from __future__ import annotations

import numpy as np
import pytest

from monet_fast.data import Sample, SyntheticTaskConfig, make_sample, make_samples, validate
from monet_fast.data.synthetic import LETTERS, PALETTE

N = 24  # enough samples to hit every shape and several letters, still well under a second


def _fingerprint(sample: Sample) -> tuple:
    """Everything observable about a sample, images as raw bytes."""
    segs = tuple(
        (s.kind, s.text, None if s.image is None else (s.image.size, s.image.tobytes()))
        for s in sample.question + sample.reasoning
    )
    return segs, sample.answer, sample.key, tuple(sample.choices), sample.category, str(sample.meta)


def _color_counts(image, min_chroma: int = 60) -> dict[str, int]:
    """Pixels per palette colour, counting only saturated pixels (the background is grey)."""
    px = np.asarray(image, dtype=np.int32).reshape(-1, 3)
    px = px[px.max(1) - px.min(1) > min_chroma]
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names])
    nearest = ((px[:, None, :] - ref[None]) ** 2).sum(-1).argmin(1)
    return {names[k]: int((nearest == k).sum()) for k in range(len(names)) if (nearest == k).any()}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(N, seed=11)


def test_deterministic_and_seed_dependent(samples):
    again = make_samples(N, seed=11)
    assert [_fingerprint(s) for s in samples] == [_fingerprint(s) for s in again]
    other = make_samples(N, seed=12)
    assert all(_fingerprint(a) != _fingerprint(b) for a, b in zip(samples, other))


def test_sample_i_independent_of_n_and_start(samples):
    fewer = make_samples(5, seed=11)
    assert [_fingerprint(s) for s in fewer] == [_fingerprint(s) for s in samples[:5]]
    offset = make_samples(3, seed=11, start=7)
    assert [_fingerprint(s) for s in offset] == [_fingerprint(s) for s in samples[7:10]]
    assert _fingerprint(make_sample(4, seed=11)) == _fingerprint(samples[4])
    # Held-out split by offset: distinct ids.
    assert {s.key for s in samples}.isdisjoint(s.key for s in make_samples(3, seed=11, start=N))


def test_rendered_wording(samples):
    s = samples[0]
    shape, color = s.meta["target_shape"], s.meta["target_color"]
    options = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(s.choices))
    assert s.question[1].text == f"What is the color of the small {shape}?\n{options}"
    assert [(g.kind, g.text) for g in s.reasoning] == [
        ("text", f"I need to look closely at the {shape}."),
        ("aux_image", ""),
        ("observation", f"The {shape} is {color}."),
        ("text", " So the answer is "),
        ("answer", f"\\boxed{{{s.answer}}}"),
    ]
    assert s.question[0].kind == "image" and s.question[0].image.size == (112, 112)
    assert s.reasoning[1].image.size == (56, 56)
    validate(samples)  # structurally valid Monet samples (observation after the aux image, ...)


def test_answer_letter_matches_target_color(samples):
    for s in samples:
        assert len(s.choices) == 4 and len(set(s.choices)) == 4
        assert s.answer in LETTERS[:4]
        assert s.choices[LETTERS.index(s.answer)] == s.meta["target_color"]
        assert s.category == s.meta["target_shape"]
    # Options are shuffled: the right letter is not always the same.
    assert len({s.answer for s in samples}) >= 3


def test_crop_shows_the_target(samples):
    for s in samples:
        counts = _color_counts(s.reasoning[1].image)
        assert max(counts, key=counts.get) == s.meta["target_color"], (s.key, counts)
        # Distractors are kept out of the crop, so the target is the only saturated colour there.
        # Chroma 90, not 60: edge pixels blended with the grey background by the bicubic zoom can
        # sit nearer another hue (2000 samples checked: none left above 90).
        assert set(_color_counts(s.reasoning[1].image, min_chroma=90)) == {s.meta["target_color"]}


def test_target_visible_in_full_image(samples):
    for s in samples:
        x0, y0, x1, y1 = s.meta["target_box"]
        counts = _color_counts(s.question[0].image.crop((x0, y0, x1, y1)))
        assert max(counts, key=counts.get) == s.meta["target_color"], (s.key, counts)


def test_distractors_unambiguous_and_outside_crop(samples):
    shapes_seen = set()
    for s in samples:
        shapes_seen.add(s.meta["target_shape"])
        cx0, cy0, cx1, cy1 = s.meta["crop_box"]
        assert len(s.meta["distractors"]) == 5  # the default canvas fits all of them
        for d in s.meta["distractors"]:
            assert d["shape"] != s.meta["target_shape"]
            assert d["color"] in s.choices  # default: only option colours appear
            x0, y0, x1, y1 = d["box"]
            assert x1 <= cx0 or cx1 <= x0 or y1 <= cy0 or cy1 <= y0
    assert shapes_seen == {"circle", "square", "triangle", "diamond", "cross"}


def test_options_and_config(samples):
    easy = make_samples(3, seed=11, n_distractors=0, n_choices=2)
    assert all(s.meta["distractors"] == [] and len(s.choices) == 2 for s in easy)
    cfg = SyntheticTaskConfig(canvas_size=224, aux_size=112, distractor_colors="palette", seed=11)
    big = make_samples(2, config=cfg)
    assert big[0].question[0].image.size == (224, 224) and big[0].key == "synthetic_11_0"
    assert big[0].meta["config"] != samples[0].meta["config"]  # fingerprint tracks the config
    with pytest.raises(TypeError, match="unknown synthetic task options \\['n_distractor'\\]"):
        make_samples(1, n_distractor=3)
    with pytest.raises(ValueError, match="n_choices must be in \\[2, 6\\]"):
        SyntheticTaskConfig(n_choices=7)
    with pytest.raises(ValueError, match="shapes must be >= 2 distinct"):
        SyntheticTaskConfig(shapes=("circle",))
    with pytest.raises(ValueError, match="target_size must satisfy"):
        SyntheticTaskConfig(target_size=(8, 40))


def test_unshuffled_choices_fix_each_colour_letter():
    from monet_fast.data.synthetic import LETTERS, SyntheticTaskConfig

    colors = ("red", "green", "blue", "yellow")
    cfg = SyntheticTaskConfig(colors=colors, n_choices=4, shuffle_choices=False)
    for s in make_samples(12, seed=3, config=cfg):
        assert s.choices == list(colors)
        assert s.answer == LETTERS[colors.index(s.meta["target_color"])]
