"""Typed training/eval samples: a conversation as an ordered list of segments.

Everything downstream (sequence layout, collate, training, eval) reads these types, never the
on-disk JSON, so the reference's Monet-SFT format and our synthetic task share one path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from monet_fast.data.errors import DataError
from monet_fast.data.images import open_rgb

SegmentKind = Literal["text", "image", "aux_image", "observation", "answer"]
SEGMENT_KINDS: tuple[str, ...] = ("text", "image", "aux_image", "observation", "answer")

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class Segment:
    """One piece of a turn.

    kind:
      - "text": plain text.
      - "image": a question image (user turn); always visible.
      - "aux_image": an auxiliary image in the assistant turn (crop/zoom). Stage 1 shows it as an
        image, stage 2 shows it followed by K latent slots, stage 3/inference replace it by K slots.
      - "observation": text stating what the preceding auxiliary image shows (wrapped in
        <observation>...</observation>, loss-weighted).
      - "answer": the final answer span of the assistant turn (e.g. "\\boxed{B}").
    """

    kind: SegmentKind
    text: str = ""
    image: Image.Image | None = None
    path: str | None = None  # where the image came from, for error messages

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")
        if self.kind in ("image", "aux_image"):
            if self.image is None and self.path is None:
                raise ValueError(f"{self.kind} segment needs an image or a path")
        elif self.image is not None:
            raise ValueError(f"{self.kind} segment cannot carry an image")

    def load_image(self) -> Image.Image:
        """The segment's image: the in-memory one, else decoded from `path` as RGB.

        Not cached on purpose: a lazily read dataset (`read_monet_sft(load_images=False)`) then
        holds file paths only, and memory stays flat however many samples are touched.
        """
        if self.image is not None:
            return self.image
        if self.path is None:
            raise ValueError(f"{self.kind} segment has neither an image nor a path")
        return open_rgb(self.path)


@dataclass
class Sample:
    """A multimodal chat sample: user turn (question) and assistant turn (reasoning)."""

    question: list[Segment]  # kinds: "image", "text"
    reasoning: list[Segment]  # kinds: "text", "aux_image", "observation", "answer"
    answer: str  # gold answer, e.g. "B"
    sample_id: str = "0"
    dataset_name: str = "synthetic"
    system: str = DEFAULT_SYSTEM
    choices: list[str] | None = None  # multiple-choice options, if any
    category: str | None = None  # for per-category accuracy
    source: str | None = None  # "file.json:row" for error messages
    meta: dict = field(default_factory=dict)

    @property
    def question_images(self) -> list[Image.Image]:
        """Question images in order (loaded from disk if the sample was read lazily).

        A bad file raises `DataError` naming the image and this sample's source and sample_id.
        """
        return self._load([s for s in self.question if s.kind == "image"])

    @property
    def aux_images(self) -> list[Image.Image]:
        """Auxiliary images in order (loaded from disk if the sample was read lazily)."""
        return self._load([s for s in self.reasoning if s.kind == "aux_image"])

    def _load(self, segments: list[Segment]) -> list[Image.Image]:
        try:
            return [s.load_image() for s in segments]
        except DataError as err:
            raise err.at_source(self.source, self.sample_id) from None

    @property
    def key(self) -> str:
        """Stable identity used by teacher caches (dataset_name + sample_id, as the reference)."""
        return f"{self.dataset_name}_{self.sample_id}"
