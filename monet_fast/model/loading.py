"""Load and save Monet / Qwen2.5-VL / Qwen3-VL checkpoints from local directories.

`load_pretrained` accepts our own saves, the released Qwen2.5-VL-7B / Monet-7B directory
layouts and Qwen3-VL directories (any `model_type` with an adapter in `monet_fast.model.arch`).
It checks the directory up front, so a missing or truncated file is reported by name instead of
surfacing as a deep transformers or safetensors error, then loads the stock class of the
architecture (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`; so plain
transformers can load what we save), adds Monet's tokens (idempotent), makes sure the embedding
table holds every id (never shrinking it: Qwen2.5-VL-7B's 152,064 rows already cover Monet's
ids, as in the reference), and applies the latent config. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .arch import get_arch, supported
from .config import LatentConfig, apply_latent_config, get_latent_config
from .processor import MonetProcessor, missing_processor_files
from .tokens import IMAGE_PAD, ensure_embedding_rows

CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"


def _weight_files(path: Path) -> list[Path] | None:
    """The safetensors files a checkpoint's weights live in ([] for .bin, None if no weights)."""
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    index = path / SAFE_WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"corrupted weight index {index}: {err}") from err
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / TORCH_WEIGHTS).is_file() or (path / TORCH_WEIGHTS_INDEX).is_file():
        return []
    return None


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Raise a clear error unless `path` is a complete, readable checkpoint directory of a
    supported architecture (`monet_fast.model.arch.supported()`).

    FileNotFoundError lists every missing piece (config, weights, shards, tokenizer, image
    processor config); ValueError names a config.json that is not JSON or of an unsupported
    model_type, and a
    safetensors file whose header is corrupt or whose data is truncated. (Bit flips inside
    tensor data are not detectable: safetensors carries no checksum.)
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    missing = []
    if not (p / CONFIG_FILE).is_file():
        missing.append(f"{CONFIG_FILE} (model config)")
    weights = _weight_files(p)
    if weights is None:
        missing.append(f"model weights ({SAFE_WEIGHTS}, {SAFE_WEIGHTS_INDEX} or {TORCH_WEIGHTS})")
    else:
        missing += [f"weight shard {w.name}" for w in weights if not w.is_file()]
    missing += missing_processor_files(p)
    if missing:
        raise FileNotFoundError(
            f"checkpoint directory {str(p)!r} is incomplete: missing {', '.join(missing)}"
        )

    try:
        config = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{p / CONFIG_FILE} is not valid JSON: {err}") from err
    if config.get("model_type") not in supported():
        raise ValueError(
            f"{p / CONFIG_FILE} has model_type {config.get('model_type')!r}; "
            f"monet_fast loads {supported()} checkpoints (adapters in monet_fast/model/arch/)"
        )

    from safetensors import safe_open

    for w in weights or []:
        # Opening parses the header and checks that the data section covers exactly the
        # tensors it lists, which catches garbage, empty and truncated files cheaply (mmap).
        try:
            with safe_open(str(w), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # SafetensorError is not exported under a stable name
            raise ValueError(
                f"corrupted or truncated safetensors file {w}: {err}; re-copy or re-save the "
                "checkpoint"
            ) from err
    return p


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    device: Any = None,
    latent_size: int | None = None,
    latent_layout: str | None = None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    quantize: str | None = None,
) -> tuple[Any, MonetProcessor]:
    """Load (model, processor) from a local checkpoint directory.

    Args:
        path: our save, or a Qwen2.5-VL-7B / Monet-7B / Qwen3-VL directory (local files only).
        dtype: torch dtype or name ("bfloat16"); None keeps the dtype stored in config.json.
        device: where to move the model (e.g. "cuda"); None leaves it on the CPU.
        latent_size, latent_layout: override the saved latent config (K and layout).
        min_pixels, max_pixels: override the image budget of preprocessor_config.json (the
            stock Qwen2.5-VL-7B allows up to 12.8 M pixels, i.e. 16,384 tokens per image).
        quantize: "4bit" | "8bit" loads the weights quantized by bitsandbytes (QLoRA; CUDA
            only, placed on `device` or cuda:0 at load; see
            `monet_fast.model.quantize.quantization_config`).

    Returns the stock model class of the directory's model_type (e.g.
    `Qwen2_5_VLForConditionalGeneration`) in eval mode and a MonetProcessor
    whose tokenizer has Monet's tokens; `model.config` carries the latent config with the
    tokenizer's latent ids.
    """
    p = check_checkpoint_dir(path)
    adapter = get_arch(json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))["model_type"])
    extra: dict[str, Any] = {}
    if quantize is not None:
        import torch

        from .quantize import quantization_config

        compute = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        extra["quantization_config"] = quantization_config(quantize, compute or torch.bfloat16)
        # Quantized weights cannot be moved after loading: place them while loading.
        extra["device_map"] = {"": str(device) if device is not None else "cuda:0"}
        device = None
    model = adapter.model_class().from_pretrained(
        str(p), local_files_only=True, dtype=dtype if dtype is not None else "auto", **extra
    )
    processor = MonetProcessor.from_pretrained(p, min_pixels=min_pixels, max_pixels=max_pixels)
    tokenizer = processor.tokenizer

    # A tokenizer from a different model would silently scramble images and text.
    image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if model.config.image_token_id != image_pad_id:
        raise ValueError(
            f"{p}: config.json has image_token_id {model.config.image_token_id} but the "
            f"tokenizer maps {IMAGE_PAD} to {image_pad_id}; tokenizer and model do not match"
        )

    ensure_embedding_rows(model, tokenizer)

    saved = get_latent_config(model)
    latent = LatentConfig.from_tokenizer(
        tokenizer,
        latent_size=latent_size if latent_size is not None else saved.latent_size,
        latent_layout=latent_layout if latent_layout is not None else saved.latent_layout,
    )
    apply_latent_config(model, latent.replace(feedback_norm=saved.feedback_norm))

    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def save_pretrained(
    model: Any,
    processor: MonetProcessor,
    path: str | os.PathLike,
    *,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write model (config.json + safetensors) and processor files to `path`, atomically.

    state_dict: the weights to write instead of the model's own (e.g. LoRA merged into the base,
    `monet_fast.model.lora.export_merged`), under the model's plain parameter names.

    Everything is written into a temporary sibling directory that is renamed into place only
    when complete, so an interrupted save never leaves a half-written checkpoint at `path`; an
    existing checkpoint there is replaced. Call it on one rank only in distributed runs.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp creates the directory 0o700; give the checkpoint the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        processor.save_pretrained(tmp)
        if target.exists():
            # Two renames: directories cannot be replaced by one os.replace when non-empty.
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
