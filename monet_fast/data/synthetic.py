"""A V*-like "find the small object" task, generated in code, for offline tests and the demo.

Each sample is a noisy canvas with several distractor shapes and ONE small target shape whose
kind no distractor shares, a multiple-choice question about the target's colour, and a Monet-style
assistant turn: look → zoomed crop (auxiliary image) → observation → boxed letter. The crop alone
answers the question (the target fills it, distractors are kept out of it); the full canvas does
too, but the target spans under half a visual token there, which is what makes latents useful.

Sizes default to the tiny test model: 14 px patches with a 2x2 merge = 28 px per visual token,
so the 112 px canvas costs 4x4 tokens and the 56 px auxiliary image 2x2.

Rendered sample (shape/colours/letter vary):

    user:      [canvas] "What is the color of the small triangle?\\nA. red\\nB. blue\\nC. green\\nD. yellow"
    assistant: "I need to look closely at the triangle." [zoomed crop]
               <observation>"The triangle is red."</observation> " So the answer is " "\\boxed{A}"

Determinism: sample `i` of seed `s` is drawn from its own `random.Random("monet_fast.synthetic/s/i")`
(string seeds are hashed with SHA-512, stable across runs and Python versions), so it is
byte-identical every time and does not depend on how many samples are made. Take disjoint splits
with different seeds, or with `start` offsets of one seed (e.g. train `start=0`, held-out
`start=100_000`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from monet_fast.data.types import Sample, Segment
from monet_fast.data.writer import write_monet_sft

# Saturated, well-separated colours (pairwise RGB distance > 100, chroma > 120) on a grey
# background (chroma ~0), so "which colour is this pixel" is never ambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DISTRACTOR_COLOR_MODES = ("choices", "palette")

# Free border around every shape, and the minimum gap between placed objects, in pixels.
_MARGIN = 2
_GAP = 2
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Knobs of the synthetic task. Defaults fit the tiny model (28 px per visual token).

    Difficulty grows with smaller `target_size`, more `n_distractors`, `distractor_colors="choices"`
    (every option colour appears in the image, so colour presence alone gives nothing away),
    larger `noise`/`texture`, and a larger `crop_jitter` (target off-centre in the crop).
    """

    canvas_size: int = 112  # side of the question image (4x4 visual tokens)
    crop_size: int = 28  # side of the canvas window around the target (2x zoom into aux_size)
    aux_size: int = 56  # side of the auxiliary image the crop is resized to (2x2 tokens)
    target_size: tuple[int, int] = (8, 12)  # inclusive range of the target's side
    distractor_size: tuple[int, int] = (14, 22)  # inclusive range of a distractor's side
    n_distractors: int = 5  # fewer may fit on a small canvas; meta["distractors"] has the truth
    n_choices: int = 4
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(PALETTE)
    distractor_colors: str = "choices"  # "choices": option colours only; "palette": any colour
    # False lists the options in palette order (the letter of a colour is then fixed: an easier
    # task whose answer needs no reading of the options, used by the tiny demo).
    shuffle_choices: bool = True
    crop_jitter: int = 4  # max offset of the crop centre from the target centre (px)
    noise: int = 10  # per-pixel grey noise amplitude over the whole canvas (+-)
    texture: int = 12  # amplitude of a random linear background gradient (+-)
    seed: int = 0  # used when make_samples() gets no seed
    dataset_name: str = "synthetic"

    def __post_init__(self) -> None:
        # Accept lists from YAML / kwargs but store tuples (frozen + hashable).
        for name in ("target_size", "distractor_size", "shapes", "colors"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown_shapes = sorted(set(self.shapes) - set(SHAPES))
        if unknown_shapes or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ValueError(
                f"shapes must be >= 2 distinct names from {SHAPES}, got {self.shapes} "
                "(distractors need a shape other than the target's)"
            )
        if set(self.colors) - set(PALETTE) or len(set(self.colors)) != len(self.colors):
            raise ValueError(
                f"colors must be distinct names from {tuple(PALETTE)}, got {self.colors}"
            )
        if not 2 <= self.n_choices <= min(len(self.colors), len(LETTERS)):
            raise ValueError(
                f"n_choices must be in [2, {min(len(self.colors), len(LETTERS))}] "
                f"(number of colors), got {self.n_choices}"
            )
        if self.distractor_colors not in DISTRACTOR_COLOR_MODES:
            raise ValueError(
                f"distractor_colors must be one of {DISTRACTOR_COLOR_MODES}, "
                f"got {self.distractor_colors!r}"
            )
        if not 1 <= self.crop_size <= self.canvas_size or self.aux_size < 1:
            raise ValueError(
                f"need 1 <= crop_size <= canvas_size and aux_size >= 1, got crop_size="
                f"{self.crop_size}, canvas_size={self.canvas_size}, aux_size={self.aux_size}"
            )
        lo, hi = self.target_size
        if not 3 <= lo <= hi <= min(self.crop_size, self.canvas_size - 2 * _MARGIN):
            raise ValueError(
                f"target_size must satisfy 3 <= lo <= hi <= crop_size ({self.crop_size}) and fit "
                f"the canvas, got {self.target_size}"
            )
        lo, hi = self.distractor_size
        if not 3 <= lo <= hi <= self.canvas_size - 2 * _MARGIN:
            raise ValueError(
                f"distractor_size must satisfy 3 <= lo <= hi <= canvas_size - {2 * _MARGIN}, "
                f"got {self.distractor_size}"
            )
        for name in ("n_distractors", "crop_jitter", "noise", "texture"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.noise > 64:
            raise ValueError(f"noise must be <= 64 to keep colours recognisable, got {self.noise}")

    def fingerprint(self) -> str:
        """Short hash of every field except `seed`: teacher caches keyed by sample id must be
        rebuilt when it changes."""
        fields = dataclasses.asdict(self)
        fields.pop("seed")
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    def with_options(self, **options) -> SyntheticTaskConfig:
        """A copy with some fields replaced; unknown names are rejected with the allowed ones."""
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"unknown synthetic task options {unknown}; allowed: {sorted(allowed)}")
        return dataclasses.replace(self, **options)


def question_text(shape: str, options: list[str]) -> str:
    lines = [f"What is the color of the small {shape}?"]
    lines += [f"{LETTERS[k]}. {color}" for k, color in enumerate(options)]
    return "\n".join(lines)


def reasoning_segments(shape: str, color: str, letter: str, aux: Image.Image) -> list[Segment]:
    """The assistant turn. Short fixed sentences, so a tiny model learns them in few steps."""
    return [
        Segment("text", f"I need to look closely at the {shape}."),
        Segment("aux_image", image=aux),
        Segment("observation", f"The {shape} is {color}."),
        Segment("text", " So the answer is "),
        Segment("answer", f"\\boxed{{{letter}}}"),
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, size: int, fill) -> None:
    x1, y1 = x0 + size - 1, y0 + size - 1  # inclusive box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        half = max(1, size // 6)  # bar thickness ~ size/3, so it reads as a cross, not a blob
        draw.rectangle([x0, round(cy) - half, x1, round(cy) + half], fill=fill)
        draw.rectangle([round(cx) - half, y0, round(cx) + half, y1], fill=fill)
    else:  # pragma: no cover - the config rejects unknown shapes
        raise ValueError(f"unknown shape {shape!r}")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether half-open boxes (x0, y0, x1, y1) come closer than `gap` pixels."""
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def make_sample(index: int, seed: int = 0, config: SyntheticTaskConfig | None = None) -> Sample:
    """Sample `index` of the task with this seed and config (independent of any other sample)."""
    cfg = config or SyntheticTaskConfig()
    rng = random.Random(f"monet_fast.synthetic/{seed}/{index}")
    size = cfg.canvas_size

    # What to ask: the target's shape and colour, the options and their order.
    shape = rng.choice(cfg.shapes)
    options = rng.sample(cfg.colors, cfg.n_choices)  # random order = shuffled options
    if not cfg.shuffle_choices:
        options = [c for c in cfg.colors if c in options]
    color = rng.choice(options)
    letter = LETTERS[options.index(color)]

    # Where: target anywhere; crop window around it (jittered, clamped inside the canvas).
    t_size = rng.randint(*cfg.target_size)
    tx = rng.randint(_MARGIN, size - t_size - _MARGIN)
    ty = rng.randint(_MARGIN, size - t_size - _MARGIN)
    target_box = (tx, ty, tx + t_size, ty + t_size)
    # Bounded jitter keeps the whole target inside the window (clamping only moves it closer).
    jitter = min(cfg.crop_jitter, (cfg.crop_size - t_size) // 2)
    cx = tx + t_size // 2 + rng.randint(-jitter, jitter)
    cy = ty + t_size // 2 + rng.randint(-jitter, jitter)
    wx = min(max(cx - cfg.crop_size // 2, 0), size - cfg.crop_size)
    wy = min(max(cy - cfg.crop_size // 2, 0), size - cfg.crop_size)
    crop_box = (wx, wy, wx + cfg.crop_size, wy + cfg.crop_size)
    assert _overlaps(crop_box, target_box, 0) and crop_box[0] <= tx and crop_box[2] >= tx + t_size

    # Distractors: other shapes only (unambiguous question), outside the crop window (the crop
    # shows the target alone) and apart from each other. A crowded canvas places fewer.
    other_shapes = [s for s in cfg.shapes if s != shape]
    distractor_pool = options if cfg.distractor_colors == "choices" else list(cfg.colors)
    distractors: list[dict] = []
    taken = [crop_box]
    for _ in range(cfg.n_distractors):
        d_shape = rng.choice(other_shapes)
        d_color = rng.choice(distractor_pool)
        d_size = rng.randint(*cfg.distractor_size)
        for _try in range(_PLACEMENT_TRIES):
            dx = rng.randint(_MARGIN, size - d_size - _MARGIN)
            dy = rng.randint(_MARGIN, size - d_size - _MARGIN)
            box = (dx, dy, dx + d_size, dy + d_size)
            if not any(_overlaps(box, other, _GAP) for other in taken):
                taken.append(box)
                distractors.append({"shape": d_shape, "color": d_color, "box": list(box)})
                break

    # Background: grey level + linear gradient in a random direction (texture) ...
    base = rng.randint(95, 125)
    angle_x, angle_y = rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)
    norm = max(abs(angle_x) + abs(angle_y), 1e-6)
    ramp = (np.arange(size, dtype=np.float64) / max(size - 1, 1)) - 0.5
    gradient = cfg.texture * 2 * (ramp[None, :] * angle_x + ramp[:, None] * angle_y) / norm
    background = np.clip(np.rint(base + gradient), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(np.repeat(background[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(canvas)
    for d in distractors:
        x0, y0, x1, _ = d["box"]
        _draw_shape(draw, d["shape"], x0, y0, x1 - x0, PALETTE[d["color"]])
    _draw_shape(draw, shape, tx, ty, t_size, PALETTE[color])

    # ... then grey noise over everything (shapes too), from rng bytes so it is reproducible
    # without depending on numpy's generator streams.
    raw = np.frombuffer(rng.randbytes(size * size), dtype=np.uint8).reshape(size, size)
    noise = (raw.astype(np.int16) * (2 * cfg.noise + 1)) // 256 - cfg.noise
    pixels = np.asarray(canvas, dtype=np.int16) + noise[:, :, None]
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    aux = canvas.crop(crop_box).resize((cfg.aux_size, cfg.aux_size), Image.Resampling.BICUBIC)

    return Sample(
        question=[Segment("image", image=canvas), Segment("text", question_text(shape, options))],
        reasoning=reasoning_segments(shape, color, letter, aux),
        answer=letter,
        sample_id=f"{seed}_{index}",
        dataset_name=cfg.dataset_name,
        choices=list(options),
        category=shape,
        meta={
            "index": index,
            "seed": seed,
            "target_shape": shape,
            "target_color": color,
            "target_box": list(target_box),
            "crop_box": list(crop_box),
            "distractors": distractors,
            "config": cfg.fingerprint(),
        },
    )


def make_samples(
    n: int,
    seed: int | None = None,
    *,
    start: int = 0,
    config: SyntheticTaskConfig | None = None,
    **options,
) -> list[Sample]:
    """Samples `start .. start+n-1` of the task (in memory, PIL images).

    `seed` defaults to `config.seed` (0). `options` override config fields, e.g.
    `make_samples(8, seed=1, n_distractors=2)`. Sample i does not depend on `n`.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    cfg = (config or SyntheticTaskConfig()).with_options(**options)
    seed = cfg.seed if seed is None else seed
    return [make_sample(index, seed, cfg) for index in range(start, start + n)]


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    config: SyntheticTaskConfig | None = None,
    *,
    start: int = 0,
    name: str = "train.json",
) -> Path:
    """Generate the task and write it in the Monet-SFT on-disk format; returns the JSON path.

    Reading it back with `read_monet_sft` goes through the same path as the real datasets.
    """
    samples = make_samples(n, seed, start=start, config=config)
    return write_monet_sft(samples, out_dir, name=name)


__all__ = [
    "PALETTE",
    "SHAPES",
    "SyntheticTaskConfig",
    "make_sample",
    "make_samples",
    "question_text",
    "reasoning_segments",
    "write_synthetic_dataset",
]
