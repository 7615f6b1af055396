"""Latent interventions: what replaces (or hides, or skips) the latents during decoding.

An evaluation reruns the same questions once per intervention and reports Δaccuracy vs `none`.
If accuracy barely moves when the latents are destroyed, the model is not using them.

Vector-level interventions rewrite each latent before it is fed back as the next input embedding;
the decoder calls `transform(latents, sample_index, step)` once per latent step with the batch's
fed-back hidden states [B, H]:

* `none`     -- identity (the baseline).
* `zero`     -- all zeros.
* `constant` -- one fixed vector for every latent of every sample: `constant` if given, else a
  random direction drawn from `seed`, scaled to `constant_norm` if given, else to the mean L2 norm
  of the latents passed to `fit(traces)` (use the `none` run's traces), else to the mean norm of
  the first batch `transform` sees -- then frozen, so the vector never changes during a run (this
  last fallback depends on which samples come first; prefer `fit` or `constant_norm`).
* `noise`    -- Gaussian direction with each replaced latent's own L2 norm (so only the
  direction's information is destroyed, not the scale the later layers expect). The draw is
  seeded per (seed, sample_index, step): reproducible whatever the batch composition.
* `shuffle`  -- the latent another sample produced at the same step in the `none` run. `fit`
  stores the donor bank and a fixed derangement (Sattolo's algorithm: one random cycle through all
  samples, so no sample is its own donor); if the donor has no latent at that step the next
  sample along the cycle that has one is used, and if no other sample reached that step, the
  donor's latent at `step mod len(donor)`.

Decoder-level interventions leave the vectors alone and are read as flags:

* `mask`      -- `masks_latent_slots`: once a latent block has closed, its latent positions are
  hidden from every later token (attention mask), so the answer cannot read the latents
  directly (inside the block the latent chain is untouched).
* `no-latent` -- `skips_latent_blocks`: `<abs_vis_token>` is masked out of the logits, so the
  decoder never opens a latent block (zero latent steps; the model answers in text only).

`sample_index` is the sample's position in the evaluated list (the same in every run) and `step`
its latent's flat index within that sample's whole trace (block-major, counting across blocks,
as in `monet_fast.eval.collapse`); `step` may be one int for the batch or a [B] tensor, because
samples of one batch can be at different latent steps.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch

from monet_fast.eval.collapse import TraceLike

INTERVENTIONS: tuple[str, ...] = (
    "none",
    "zero",
    "constant",
    "noise",
    "shuffle",
    "mask",
    "no-latent",
)
VECTOR_INTERVENTIONS: tuple[str, ...] = ("none", "zero", "constant", "noise", "shuffle")
DECODER_INTERVENTIONS: tuple[str, ...] = ("mask", "no-latent")


def parse_interventions(spec: str | Sequence[str]) -> list[str]:
    """ "none,zero,shuffle" (or a list) -> validated, de-duplicated names with `none` first
    (the baseline every Δ is measured against, and the donor run of `shuffle`)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {name!r}")
        if name not in out:
            out.append(name)
    if "none" in out:
        out.remove("none")
    return ["none", *out]


def _seed_of(*parts: object) -> int:
    # Stable across processes and Python versions (unlike hash()); 63 bits for torch.Generator.
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _gaussian(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, generator=generator, dtype=torch.float32)


def _flat_trace(trace: TraceLike) -> torch.Tensor:
    """A trace as a CPU tensor [n_latents, H] (or [0, 0] when empty)."""
    if trace is None:
        return torch.zeros(0, 0)
    t = trace.detach().cpu() if isinstance(trace, torch.Tensor) else torch.as_tensor(trace)
    if t.numel() == 0:
        return torch.zeros(0, t.shape[-1] if t.dim() >= 2 else 0, dtype=t.dtype)
    if t.dim() == 3:
        t = t.reshape(-1, t.shape[-1])
    if t.dim() != 2:
        raise ValueError(
            f"a trace must be [n_blocks, K, H] or [n_latents, H], got {tuple(t.shape)}"
        )
    return t


class LatentIntervention:
    """One intervention of `INTERVENTIONS` (see the module docstring for each).

    Args:
        name: the intervention.
        seed: seeds the constant's direction, the noise and the shuffle derangement.
        constant: for `constant`, the vector [H] to use as is.
        constant_norm: for `constant` without a vector, the norm of the seeded direction.
    """

    def __init__(
        self,
        name: str,
        seed: int = 0,
        constant: torch.Tensor | None = None,
        *,
        constant_norm: float | None = None,
    ) -> None:
        if name not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {name!r}")
        if constant is not None and name != "constant":
            raise ValueError(f"a constant vector only applies to 'constant', not {name!r}")
        if constant is not None and constant.dim() != 1:
            raise ValueError(f"constant must be a vector [H], got shape {tuple(constant.shape)}")
        if constant_norm is not None and constant_norm < 0:
            raise ValueError(f"constant_norm must be >= 0, got {constant_norm}")
        self.name = name
        self.seed = seed
        self.constant_norm = constant_norm
        self._constant = None if constant is None else constant.detach().float().cpu()
        self._fitted_norm: float | None = None
        self._bank: list[torch.Tensor] | None = None
        self._next: list[int] | None = None  # derangement: donor of sample s is _next[s]

    def __repr__(self) -> str:
        return f"LatentIntervention({self.name!r}, seed={self.seed})"

    # -- flags read by the decoder --------------------------------------------------------------

    @property
    def modifies_vectors(self) -> bool:
        """Whether `transform` changes latents (False for none, mask, no-latent)."""
        return self.name in VECTOR_INTERVENTIONS and self.name != "none"

    @property
    def masks_latent_slots(self) -> bool:
        """Latent positions must be hidden from all later tokens."""
        return self.name == "mask"

    @property
    def skips_latent_blocks(self) -> bool:
        """The decoder must never open a latent block (<abs_vis_token> masked out)."""
        return self.name == "no-latent"

    @property
    def needs_fit(self) -> bool:
        """`fit` must run first (shuffle needs donors)."""
        return self.name == "shuffle" and self._bank is None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly settings, for the report."""
        info: dict[str, Any] = {"name": self.name, "seed": self.seed}
        if self.name == "constant":
            info["constant_given"] = self._constant is not None
            info["constant_norm"] = (
                float(self._constant.norm()) if self._constant is not None else self.constant_norm
            )
        if self.name == "shuffle" and self._bank is not None:
            info["n_donors"] = sum(1 for t in self._bank if t.shape[0])
        return info

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, traces: Sequence[TraceLike]) -> LatentIntervention:
        """Learn from a `none` run's traces (indexed by sample): the donor bank and derangement
        for `shuffle`, the mean latent norm for `constant`. A no-op for the others."""
        flats = [_flat_trace(t) for t in traces]
        if self.name == "constant":
            norms = [f.float().norm(dim=1) for f in flats if f.shape[0]]
            if norms:
                self._fitted_norm = float(torch.cat(norms).mean())
        elif self.name == "shuffle":
            if sum(1 for f in flats if f.shape[0]) < 2:
                raise ValueError("shuffle needs latents from at least 2 samples to fit donors")
            order = list(range(len(flats)))
            rng = random.Random(_seed_of("monet_fast.shuffle", self.seed, len(flats)))
            # Sattolo's algorithm: a uniformly random single cycle, hence no fixed point.
            for i in range(len(order) - 1, 0, -1):
                j = rng.randrange(i)
                order[i], order[j] = order[j], order[i]
            self._next = order
            self._bank = flats
        return self

    def donor_of(self, sample_index: int, step: int) -> int:
        """The sample whose latent at `step` replaces `sample_index`'s (shuffle only)."""
        if self._bank is None or self._next is None:
            raise RuntimeError("shuffle needs fit(traces) from a 'none' run before transform")
        n = len(self._bank)
        if not 0 <= sample_index < n:
            raise ValueError(f"sample_index {sample_index} outside the {n} fitted samples")
        donor = self._next[sample_index]
        while donor != sample_index:
            if self._bank[donor].shape[0] > step:
                return donor
            donor = self._next[donor]
        # Nobody else reached this step: the first donor with any latent (cyclic step index).
        donor = self._next[sample_index]
        while self._bank[donor].shape[0] == 0:
            donor = self._next[donor]
        return donor

    # -- the transform ------------------------------------------------------------------------

    def _constant_vector(self, hidden: int, batch: torch.Tensor) -> torch.Tensor:
        if self._constant is None:
            norm = self.constant_norm
            if norm is None:
                norm = self._fitted_norm
            if norm is None:
                norm = float(batch.float().norm(dim=1).mean())
            direction = _gaussian(hidden, _seed_of("monet_fast.constant", self.seed, hidden))
            self._constant = direction / direction.norm() * norm
        if self._constant.shape[0] != hidden:
            raise ValueError(f"constant has {self._constant.shape[0]} dims, latents have {hidden}")
        return self._constant

    def transform(
        self,
        latents: torch.Tensor,
        sample_index: torch.Tensor | Sequence[int],
        step: int | torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        """The latents to feed back instead of `latents` [B, H]; same shape, dtype and device.

        `none`, `mask` and `no-latent` return `latents` itself (no copy).
        """
        if latents.dim() != 2:
            raise ValueError(f"latents must be [B, H], got shape {tuple(latents.shape)}")
        if not self.modifies_vectors:
            return latents
        batch, hidden = latents.shape
        samples = torch.as_tensor(sample_index, dtype=torch.long).reshape(-1).tolist()
        steps = (
            [int(step)] * batch
            if isinstance(step, int)
            else torch.as_tensor(step, dtype=torch.long).reshape(-1).tolist()
        )
        if len(samples) != batch or len(steps) != batch:
            raise ValueError(
                f"need one sample_index and step per row: {batch} rows, "
                f"{len(samples)} sample indices, {len(steps)} steps"
            )
        if self.name == "zero":
            return torch.zeros_like(latents)
        if self.name == "constant":
            vector = self._constant_vector(hidden, latents)
            return vector.to(device=latents.device, dtype=latents.dtype).expand(batch, -1).clone()
        if self.name == "noise":
            # Noise and norms in fp32: a bf16 norm would be off by ~0.4 %.
            norms = latents.detach().float().norm(dim=1).cpu()
            rows = []
            for s, k, norm in zip(samples, steps, norms.tolist()):
                direction = _gaussian(hidden, _seed_of("monet_fast.noise", self.seed, s, k))
                rows.append(direction / direction.norm() * norm)
            return torch.stack(rows).to(device=latents.device, dtype=latents.dtype)
        # shuffle
        rows = []
        for s, k in zip(samples, steps):
            donor = self._bank[self.donor_of(s, k)] if self._bank is not None else None
            if donor is None:  # pragma: no cover - donor_of raised already
                raise RuntimeError("shuffle is not fitted")
            if donor.shape[1] != hidden:
                raise ValueError(f"donor latents have {donor.shape[1]} dims, latents have {hidden}")
            rows.append(donor[k % donor.shape[0]])
        return torch.stack(rows).to(device=latents.device, dtype=latents.dtype)


def apply_to_traces(
    intervention: LatentIntervention, traces: Sequence[TraceLike]
) -> list[torch.Tensor]:
    """The traces a run under `intervention` would feed back, given the latents it computed.

    Simulates the decoder: at each step k, the samples that have a k-th latent are transformed
    as one batch. Vector interventions rewrite the vectors (shapes kept); `mask` returns them
    unchanged (it acts on attention, not on vectors); `no-latent` returns empty [0, H] traces.
    Useful to test interventions and to compute collapse metrics of what was fed back.
    """
    flats = [_flat_trace(t) for t in traces]
    shapes = [None if t is None else tuple(t.shape) for t in traces]
    if intervention.skips_latent_blocks:
        return [f[:0].clone() for f in flats]
    outs = [f.clone() for f in flats]
    if intervention.modifies_vectors:
        for step in range(max((f.shape[0] for f in flats), default=0)):
            rows = [s for s, f in enumerate(flats) if f.shape[0] > step]
            batch = torch.stack([flats[s][step] for s in rows])
            new = intervention.transform(batch, torch.tensor(rows), step)
            for i, s in enumerate(rows):
                outs[s][step] = new[i]
    return [o.reshape(shape) if shape and o.numel() else o for o, shape in zip(outs, shapes)]


__all__ = [
    "DECODER_INTERVENTIONS",
    "INTERVENTIONS",
    "VECTOR_INTERVENTIONS",
    "LatentIntervention",
    "apply_to_traces",
    "parse_interventions",
]
