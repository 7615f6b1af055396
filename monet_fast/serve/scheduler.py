"""Continuous batching: one background thread owns the model and every slot of `SlotDecoder`.

Loop: free the slots of finished or cancelled requests -> prefill queued requests into free slots
(those admitted together in batched forwards of at most `max_prefill_batch` rows and
`max_prefill_tokens` padded tokens, shortest prompts grouped together) -> run `check_every` decode steps of all slots -> pull each slot's new emissions to the host,
render text, apply stop strings, stream deltas, finish requests. So requests join and leave the
running batch between decode steps, and a slot is reused by the next request as soon as it is
freed. HTTP handlers never touch the model: they `submit` a prepared `Job` and receive events
through its `notify` callback; `cancel` (a client gone) frees the slot at the next iteration.

Admission: at most `slots + max_queue` requests are in flight; one more is refused with 429.
"""

from __future__ import annotations

import base64
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from monet_fast import _ops
from monet_fast.decode.inputs import PreparedBatch
from monet_fast.decode.slots import SlotDecoder, SlotParams
from monet_fast.decode.text import collapse_latent_spans
from monet_fast.model.tokens import LATENT_END, LATENT_START
from monet_fast.serve.schema import ApiError

LATENT_MARKER = "<latent>"


@dataclass
class Result:
    """A finished request: what the response body reports."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    latent_tokens: int
    latents: list[torch.Tensor] | None = None  # [n, H] per block, with latent.return


@dataclass
class Job:
    """One request in the scheduler: its inputs, and the host-side decode state."""

    batch: PreparedBatch
    params: SlotParams
    stops: tuple[str, ...]
    return_latents: bool
    stream: bool
    notify: Callable[[str, object], None]  # ("delta", str) | ("done", Result) | ("error", ApiError)
    forced: bool = False
    ids: list[int] = field(default_factory=list)  # emissions by index (a forced START first)
    fed: list[bool] = field(default_factory=list)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    sent: str = ""  # text streamed so far
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch.input_ids.shape[1])


def display_text(
    ids: list[int], tokenizer, eos_ids, start_id: int, forced: bool
) -> tuple[str, int]:
    """(text with latent spans collapsed, index where a still-open block starts or -1)."""
    out = ids[:-1] if ids and ids[-1] in eos_ids else ids
    prefix = [start_id] if forced else []
    text = collapse_latent_spans(tokenizer.decode(prefix + out, skip_special_tokens=False))
    open_at = text.rfind(LATENT_START)
    if open_at >= 0 and text.find(LATENT_END, open_at) < 0:
        text = text[:open_at] + LATENT_START + LATENT_MARKER  # the block's size is not known yet
        return text, open_at
    return text, -1


class Scheduler:
    """Owns the model; serves `Job`s with continuous batching on a background thread."""

    def __init__(
        self,
        model,
        processor,
        *,
        slots: int,
        max_context: int,
        max_queue: int,
        check_every: int = 4,
        max_prefill_batch: int = 8,
        max_prefill_tokens: int = 8192,
        eos_ids,
        fill_id: int,
    ) -> None:
        if slots < 1 or max_queue < 0 or not 1 <= check_every <= 8:
            raise ValueError(
                f"slots must be >= 1, max_queue >= 0, check_every in [1, 8]; got {slots}, "
                f"{max_queue}, {check_every}"
            )
        if max_prefill_batch < 1 or max_prefill_tokens < 1:
            raise ValueError(
                f"max_prefill_batch and max_prefill_tokens must be >= 1; got "
                f"{max_prefill_batch}, {max_prefill_tokens}"
            )
        self.max_prefill_batch, self.max_prefill_tokens = max_prefill_batch, max_prefill_tokens
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.decoder = SlotDecoder(
            model, processor, slots, max_context, eos_ids, fill_id, ring=check_every + 2
        )
        self.slots, self.max_context, self.max_queue = slots, max_context, max_queue
        self.check_every = check_every
        self.eos_ids = tuple(eos_ids)
        self.start_id = self.decoder.latent.latent_start_id
        self.queue: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self._cond = threading.Condition()
        self.tokenizer_lock = threading.Lock()  # see prepare.build_job
        self._paused = False
        self._stop = False
        self.steps = 0  # decode steps run (for /health and tests)
        self._thread = threading.Thread(target=self._loop, name="monet-fast-serve", daemon=True)

    # ----------------------------------------------------------- handler side

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 429 ApiError when `slots + max_queue` are in flight."""
        with self._cond:
            in_flight = len(self.queue) + len(self.running)
            if in_flight >= self.slots + self.max_queue:
                raise ApiError(
                    429,
                    f"too many concurrent requests: {in_flight} in flight, the limit is "
                    f"{self.slots} running + {self.max_queue} queued; retry later",
                    code="too_many_requests",
                    type="rate_limit_error",
                )
            self.queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop `job`, freeing its slot before the next decode step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def pause(self) -> None:
        """Stop admitting and decoding (requests keep queueing) until `resume`."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "slots": self.slots,
                "running": len(self.running),
                "queued": len(self.queue),
                "free_slots": self.slots - len(self.running),
                "decode_steps": self.steps,
            }

    # ------------------------------------------------------------ model side

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._paused or not (self.queue or self.running)):
                    self._cond.wait()
                if self._stop:
                    return
                self._drop_cancelled()
                admitted = self._take_admissions()
            try:
                with torch.inference_mode():
                    self._iteration(admitted)
            except Exception as err:  # a bug: fail the requests in flight, keep serving
                with self._cond:
                    victims = list(self.running.values())
                    self.running.clear()
                for job in victims:
                    self.decoder.release(job.slot)
                    self._fail(job, ApiError(500, f"decoding failed: {err!r}", type="server_error"))

    def _drop_cancelled(self) -> None:
        self.queue = collections.deque(j for j in self.queue if not j.cancelled)
        for slot, job in list(self.running.items()):
            if job.cancelled:
                self.decoder.release(slot)
                del self.running[slot]

    def _take_admissions(self) -> list[tuple[int, Job]]:
        free = [s for s in range(self.slots) if s not in self.running]
        admitted = []
        while free and self.queue:
            job, slot = self.queue.popleft(), free.pop(0)
            job.slot = slot
            self.running[slot] = job
            admitted.append((slot, job))
        return admitted

    def _iteration(self, admitted: list[tuple[int, Job]]) -> None:
        for group in self._prefill_groups(admitted):
            try:
                self.decoder.prefill_many([(slot, job.batch, job.params) for slot, job in group])
            except ValueError:
                # One bad request must not fail the others: retry the group one by one.
                for slot, job in group:
                    self._prefill_one(slot, job)
        if self.running:
            self.decoder.decode_steps(self.check_every)
            self.steps += self.check_every
        for slot, job in list(self.running.items()):
            self._harvest(slot, job)

    def _prefill_groups(self, admitted: list[tuple[int, Job]]) -> list[list[tuple[int, Job]]]:
        """Admitted requests in prefill batches under the row and padded-token caps, shortest
        prompts together (less padding); a prompt over the token cap is prefilled alone."""
        groups: list[list[tuple[int, Job]]] = []
        for slot, job in sorted(admitted, key=lambda item: item[1].prompt_tokens):
            group = groups[-1] if groups else None
            # Sorted: this prompt is the group's longest, so it sets the padded width.
            if (
                group is None
                or len(group) >= self.max_prefill_batch
                or (len(group) + 1) * job.prompt_tokens > self.max_prefill_tokens
            ):
                groups.append([(slot, job)])
            else:
                group.append((slot, job))
        return groups

    def _prefill_one(self, slot: int, job: Job) -> None:
        try:
            self.decoder.prefill(slot, job.batch, job.params)
        except ValueError as err:
            with self._cond:
                del self.running[slot]
            self.decoder.release(slot)
            self._fail(job, ApiError(400, str(err)))

    def _fail(self, job: Job, error: ApiError) -> None:
        job.finished = True
        job.notify("error", error)

    def _harvest(self, slot: int, job: Job) -> None:
        ids, fed, vectors, last, mode = self.decoder.read(slot, len(job.ids))
        job.ids.extend(ids)
        job.fed.extend(fed)
        job.vectors.update(vectors)
        out = job.ids[int(job.forced) :]
        if mode != _ops.MODE_DONE and not job.stream and not job.stops:
            return  # nothing to show or check before the end
        with self.tokenizer_lock:
            text, open_at = display_text(
                out, self.tokenizer, self.eos_ids, self.start_id, job.forced
            )
        reason = None
        if job.stops:
            hits = [text.find(s) for s in job.stops if s in text]
            if hits:
                text, reason = text[: min(hits)], "stop"
        if reason is None and mode == _ops.MODE_DONE:
            reason = "stop" if out and out[-1] in self.eos_ids else "length"
        if reason is None:
            if job.stream:
                self._stream(job, text, open_at)
            return
        with self._cond:
            del self.running[slot]
        self.decoder.release(slot)
        job.finished = True
        job.notify("done", self._result(job, text, reason, out))

    def _stream(self, job: Job, text: str, open_at: int) -> None:
        visible = text[:open_at] if open_at >= 0 else text
        if job.stops:  # a stop string may be completing at the end: hold that part back
            visible = visible[: max(0, len(visible) - max(len(s) for s in job.stops) + 1)]
        visible = visible.rstrip("\ufffd")  # a byte-level token may end mid-character
        if len(visible) > len(job.sent) and visible.startswith(job.sent):
            job.notify("delta", visible[len(job.sent) :])
            job.sent = visible

    def _result(self, job: Job, text: str, reason: str, out: list[int]) -> Result:
        latents = None
        if job.return_latents:
            latents, prev = [], None
            for i in sorted(job.vectors):
                if prev is None or i != prev + 1:
                    latents.append([])
                latents[-1].append(job.vectors[i])
                prev = i
            latents = [torch.stack(block) for block in latents]
        return Result(
            text=text,
            finish_reason=reason,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=len(out),
            latent_tokens=sum(job.fed),
            latents=latents,
        )


def encode_latents(blocks: list[torch.Tensor]) -> list[dict]:
    """Latent blocks as JSON: shape and base64 of the little-endian float16 bytes."""
    out = []
    for block in blocks:
        array = block.to(torch.float16).contiguous().numpy().astype("<f2")
        out.append(
            {
                "shape": list(block.shape),
                "dtype": "float16",
                "data": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        )
    return out
