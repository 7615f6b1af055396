"""The one `Stage` enum: which sequence layout and loss a batch is built for.

SFT configs and the CLI number the training stages (`stage: 2`, `--stage 2`); the sequence code
names layouts ("stage1", "stage2", "stage3", "infer"). Both are the same thing, so both parse to
one `Stage`, here, and nowhere else converts. A `Stage` is a `str` whose value is the layout name,
so it compares equal to "stage2", hashes like it and serialises to JSON as that string (store
`.value` or `.number` in YAML and checkpoints: neither safe_dump nor weights-only torch.load
knows the class).
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """A sequence layout: the three SFT stages and inference (the decoder's and VLPO's layout)."""

    STAGE1 = "stage1"  # auxiliary images are shown; observation tokens follow them
    STAGE2 = "stage2"  # latent slots see the auxiliary images through the compact masked rows
    STAGE3 = "stage3"  # latent slots only; no auxiliary images in the sequence
    INFER = "infer"  # stage-3 token layout, latents produced by the model itself

    # str() and f-strings give the value, as StrEnum (3.11+) does: f"{Stage.STAGE2}" == "stage2".
    __str__ = str.__str__

    @classmethod
    def of(cls, value: Stage | str | int) -> Stage:
        """Parse a stage given as a `Stage`, a layout name ("stage2") or an SFT number (2, "2")."""
        if isinstance(value, cls):
            return value
        text = str(value).strip()
        if text.isdigit():
            text = f"stage{text}"
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in cls)
            raise ValueError(
                f"stage must be one of {allowed} (or an SFT stage number 1-3), got {value!r}"
            ) from None

    @classmethod
    def expect(cls, value: object, where: str) -> Stage:
        """`value` itself when it is a `Stage`; TypeError otherwise. Inside the package stages
        travel as `Stage`: numbers and names are parsed once, at the config / CLI boundary."""
        if not isinstance(value, cls):
            raise TypeError(
                f"{where} takes a Stage (parse config / CLI values with Stage.of), got {value!r}"
            )
        return value

    @classmethod
    def training(cls) -> tuple[Stage, ...]:
        """The SFT stages, in training order."""
        return (cls.STAGE1, cls.STAGE2, cls.STAGE3)

    @property
    def number(self) -> int | None:
        """The SFT stage number (1-3); None for the inference layout."""
        return None if self is Stage.INFER else int(self.value[-1])

    @property
    def teacher(self) -> Stage | None:
        """The layout whose forward gives this stage's alignment targets: stage 2 aligns to
        stage-1 observation states, stage 3 to stage-2 latent trajectories; None otherwise."""
        return {Stage.STAGE2: Stage.STAGE1, Stage.STAGE3: Stage.STAGE2}.get(self)


STAGE_NAMES: tuple[str, ...] = tuple(s.value for s in Stage)
SFT_STAGE_NUMBERS: tuple[int, ...] = tuple(s.number for s in Stage.training())  # type: ignore[misc]

__all__ = ["SFT_STAGE_NUMBERS", "STAGE_NAMES", "Stage"]
