"""What a bug report needs: versions of monet_fast, its extension, torch and friends, and GPUs.

Works with the core install alone: optional packages are looked up, never imported, and a
missing one is reported with the pip command that installs it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from monet_fast import _optional


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _optional_version(module: str) -> str:
    version = _optional.version(module)
    return version if version is not None else f"not installed ({_optional.install_hint(module)})"


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
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        # Optional parts: importable or not (a hidden/broken package reads "not installed").
        "triton": _optional_version("triton"),
        "deepspeed": _optional_version("deepspeed"),
        "matplotlib": _optional_version("matplotlib"),
        "flash_attn": _optional_version("flash_attn"),
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
