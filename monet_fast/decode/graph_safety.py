"""Graph safety: the logits-processor contract and a portable detector of host synchronisation.

A CUDA graph records the kernels of one decode step and replays them. Anything that makes the
host wait for a device value while the step runs cannot be recorded: `.item()`, `bool(t)`,
`if t.any():`, `.tolist()`, copies to the host, and every op whose output shape depends on
tensor values (`nonzero`, `masked_select`, indexing with a boolean mask, ...). CUDA raises inside
capture ("operation not permitted when stream is capturing"), or a value read at capture time is
baked into every replay.

`detect_host_sync()` makes such operations raise `GraphUnsafeError` on any device, CPU included:
a TorchFunctionMode catches Python-level reads of tensor values (`Tensor.__bool__`, `item`,
`tolist`, ...), a TorchDispatchMode catches the aten ops with value-dependent output shapes, and
on CUDA `torch.cuda.set_sync_debug_mode("error")` catches every other synchronising call. The
engine checks a logits processor with it before capturing (`check_logits_processor`) and decodes
eagerly, with a `GraphUnsafeProcessorWarning` naming the reason, when it fails; the CPU emulation
of graph mode (`graphs.EagerStep`) runs its whole "captured" step under it, so CPU tests catch a
host sync in the engine's own step as a GPU capture would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# The logits-processor contract (generate(logits_processor=...)):
#   fn(logits [B, V] float32, index [B] int64) -> logits [B, V] (may modify its input in place).
#   index is each row's output index of the token being sampled (-1 for the START forced by a
#   prompt that ends with it). Under CUDA graphs B is the batch bucket (padding rows at the end)
#   and the function is recorded once and replayed: it must be pure tensor ops on the logits'
#   device — no .item()/.tolist()/bool()/int() of a tensor, no Python branching on tensor
#   values, no boolean-mask indexing or nonzero/masked_select (value-dependent shapes), no
#   copies to the host, no new tensors from Python data (make them on the first call and keep
#   them: the engine calls the processor once before checking it). Python state read by the
#   function is frozen at capture; tensors it reads must keep their storage (update in place).
#   Graph-safe forms: `logits[:, tok] += (index == i) * bonus`, `torch.where(cond, x, logits)`,
#   `logits.masked_fill(mask, v)`, `logits.index_fill(-1, ids, v)`, `scatter`/`gather`.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphUnsafeError(RuntimeError):
    """Raised under `detect_host_sync()` by an operation that cannot run inside a CUDA graph."""


class GraphUnsafeProcessorWarning(UserWarning):
    """A logits processor breaks the graph-safe contract: generate() decoded without graphs."""


# Tensor methods that hand a tensor value to Python (each is a device->host sync on CUDA).
_HOST_READS = {
    "__bool__": "bool() of a tensor (Python branching on a tensor value, `if t:`)",
    "__int__": "int() of a tensor",
    "__float__": "float() of a tensor",
    "__complex__": "complex() of a tensor",
    "__index__": "a tensor used as a Python int (range, slicing)",
    "__contains__": "`x in tensor`",
    "__array__": "numpy conversion of a tensor",
    "__repr__": "printing a tensor",
    "__str__": "printing a tensor",
    "__format__": "formatting a tensor",
    "item": ".item()",
    "tolist": ".tolist()",
    "numpy": ".numpy()",
}

# aten ops whose output shape (or a host value) depends on tensor values.
_DATA_DEPENDENT = {
    "_local_scalar_dense": "reading a tensor value on the host (.item())",
    "item": "reading a tensor value on the host (.item())",
    "is_nonzero": "bool() of a tensor",
    "equal": "torch.equal (returns a host bool)",
    "nonzero": "nonzero (value-dependent output shape)",
    "nonzero_numpy": "nonzero (value-dependent output shape)",
    "argwhere": "argwhere (value-dependent output shape)",
    "masked_select": "masked_select (value-dependent output shape)",
    "unique_consecutive": "unique (value-dependent output shape)",
    "unique_dim": "unique (value-dependent output shape)",
    "unique_dim_consecutive": "unique (value-dependent output shape)",
    "_unique": "unique (value-dependent output shape)",
    "_unique2": "unique (value-dependent output shape)",
    "bincount": "bincount (value-dependent output shape)",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"}


def _op_name(func) -> str:
    packet = getattr(func, "overloadpacket", None)  # None for higher-order operators
    return packet.__name__ if packet is not None else str(func)


def _dispatch_problem(func, args, kwargs) -> str | None:
    name = _op_name(func)
    if name in _DATA_DEPENDENT:
        return _DATA_DEPENDENT[name]
    if name in ("lift_fresh", "lift_fresh_copy") and args[0].dim() > 0:
        # torch.tensor(python list): on CUDA a host->device copy at every call. (0-d ones are
        # fine: `t[i] = 0.0` makes one, and CUDA kernels take CPU scalars by value.)
        return "a tensor made from Python data (torch.tensor); make it once, outside"
    overload = getattr(func, "_overloadname", "")
    if name == "where" and overload == "default":  # where(cond) == nonzero
        return "torch.where(cond) with one argument (value-dependent output shape)"
    if name in _INDEX_OPS and len(args) > 1:
        indices = args[1] or ()
        if any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        ):
            return "boolean-mask indexing `t[mask]` (value-dependent shape; use torch.where)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        if any(isinstance(a, torch.Tensor) for a in args[1:2]) or overload == "Tensor":
            return "repeat_interleave with tensor repeats and no output_size"
    return None


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            raise GraphUnsafeError(f"calls Tensor.{name}: {_HOST_READS[name]}")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        problem = _dispatch_problem(func, args, kwargs)
        if problem is not None:
            raise GraphUnsafeError(f"calls aten.{_op_name(func)}: {problem}")
        out = func(*args, **kwargs)
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(a.device.type != "cpu" for a in ins) and any(
            isinstance(o, torch.Tensor) and o.device.type == "cpu" for o in outs
        ):
            raise GraphUnsafeError(f"calls aten.{_op_name(func)}: a copy to the host")
        return out


@contextmanager
def detect_host_sync(device: torch.device | str | None = None) -> Iterator[None]:
    """Raise `GraphUnsafeError` on any operation inside that could not run in a CUDA graph.

    Works on CPU tensors too (the Python-level and aten-level checks do not depend on the
    device); on a CUDA `device` every synchronising CUDA call is caught in addition.
    """
    device = torch.device(device) if device is not None else None
    on_cuda = device is not None and device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if on_cuda else None
    try:
        if on_cuda:
            torch.cuda.set_sync_debug_mode("error")
        with _FunctionGuard(), _DispatchGuard():
            yield
    except RuntimeError as err:
        if on_cuda and "synchronizing CUDA operation" in str(err):
            raise GraphUnsafeError(f"a synchronizing CUDA operation ({err})") from err
        raise
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode(previous)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_logits_processor(
    processor: LogitsProcessor, rows: int, vocab: int, device: torch.device
) -> str | None:
    """None if `processor` can be captured in a CUDA graph, else why not (for a warning).

    Runs it twice on zero probes of the decode step's shapes: once plainly (lazy set-up such as
    moving a constant to the device is allowed, as in capture's warm-up), then under
    `detect_host_sync`. A processor that breaks the input/output contract raises TypeError.
    """

    def probes() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(rows, vocab, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
        )

    out = processor(*probes())
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != (rows, vocab)
        or not _same_device(out.device, torch.device(device))
        or not out.is_floating_point()
    ):
        got = (
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
            if isinstance(out, torch.Tensor)
            else type(out).__name__
        )
        raise TypeError(
            f"logits_processor must return float logits of the input's shape {(rows, vocab)} "
            f"on {device}, got {got}"
        )
    try:
        with detect_host_sync(device):
            processor(*probes())
    except GraphUnsafeError as err:
        return str(err)
    return None
