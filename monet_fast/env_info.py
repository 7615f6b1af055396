"""What a bug report needs: versions of monet_fast, its extension, torch and friends, and GPUs."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_env() -> dict:
    """Collect build and runtime facts as a JSON-friendly dict."""
    import monet_fast

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return {
        "monet_fast": monet_fast.__version__,
        "extension": dict(monet_fast._C.build_info()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "deepspeed": _version("deepspeed"),
        "flash_attn": _version("flash-attn"),
        "cpu_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def format_env(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        elif key == "gpus":
            lines.append(f"gpus: {len(value) or 'none'}")
            lines += [
                f"  - {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in value
            ]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
