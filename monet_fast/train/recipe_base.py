"""What the SFT and VLPO recipes share: run set-up, the policy model, the DeepSpeed engine,
checkpoints, resume, export, clean-up and the command-line entry.

`SFTRecipe` (`loop.py`) and `VLPORecipe` (`vlpo.py`) are siblings over `RecipeBase`; neither
inherits the other. A recipe implements `setup()` (data, model, engine, progress, metrics) and
`train()`, and uses the helpers below in that order:

    setup_runtime()             distributed init, seeds, precision
    refuse_existing_checkpoints / write_run_files / write_data_report
    prepare_policy(init)        model + processor, frozen vision, LoRA, checkpointing
    init_engine(...)            deepspeed.initialize
    resume_progress(...)        the progress record, loaded from a checkpoint with --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monet_fast._compat import enable_activation_checkpointing
from monet_fast._io import atomic_write_text
from monet_fast.train import checkpoint as ckpt
from monet_fast.train.config_schema import ConfigError, RunConfig
from monet_fast.train.engine_setup import _barrier, seed_everything, setup_distributed
from monet_fast.train.lora import ADAPTER_DIR, export_lora, wrap_policy
from monet_fast.train.metrics import MetricsLogger

logger = logging.getLogger("monet_fast.train")


class RecipeBase:
    """The shared base of the training recipes (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None) -> None:
        cfg.validate()
        if cfg.output is None:
            raise ConfigError("no output directory: pass --output DIR or set output: in the config")
        self.cfg = cfg
        self.resume = resume
        self.output = Path(cfg.output)
        self.ckpt_root = self.output / ckpt.CHECKPOINT_DIR
        self.engine = None
        self.metrics: MetricsLogger | None = None
        self.peft_model = None  # the PeftModel wrapper of self.model with model.lora

    # ---- run set-up ---------------------------------------------------------------------------

    def setup_runtime(self) -> None:
        """Distributed init, seeds, and the training precision (`bf16`, `dtype`)."""
        cfg = self.cfg
        self.dist = setup_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.device = self.dist.device
        seed_everything(cfg.seed)
        if cfg.model.precision == "auto":
            self.bf16 = self.device.type == "cuda"
        else:
            self.bf16 = cfg.model.precision == "bf16"
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32

    def refuse_existing_checkpoints(self) -> None:
        """A new run (no --resume) must not write over another run's checkpoints."""
        latest = ckpt.latest_tag(self.ckpt_root)
        if latest is not None and self.resume is None:
            raise ConfigError(
                f"{self.output} already holds checkpoints (latest: {latest}); pass --resume to "
                "continue that run or choose another --output"
            )

    def write_run_files(self) -> None:
        """Rank 0: the output directory and the resolved config.yaml in it."""
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output / "config.yaml", self.cfg.dump())

    def write_data_report(self) -> None:
        """Rank 0: data_report.json (rows read, skipped and why) of `self.data_report`."""
        if self.rank == 0:
            atomic_write_text(
                self.output / "data_report.json", json.dumps(self.data_report.to_dict(), indent=2)
            )

    # ---- the policy model ---------------------------------------------------------------------

    def load_model(self, path: str | None, quantize: str | None = None) -> tuple[nn.Module, Any]:
        """(model, processor) from a directory, or the tiny model when path is None.
        quantize: model.quantize (QLoRA base, loaded onto the device; the policy only)."""
        from monet_fast.model.config import LatentConfig, apply_latent_config, get_latent_config
        from monet_fast.model.loading import load_pretrained
        from monet_fast.model.tiny import tiny_model

        cfg = self.cfg.model
        if path is not None:
            model, processor = load_pretrained(
                path,
                dtype=self.dtype,
                quantize=quantize,
                device=self.device if quantize else None,
            )
        else:
            model, processor = tiny_model(
                cfg.tiny_seed, latent_size=cfg.latent_size, arch=cfg.tiny_arch
            )
        if quantize is None:  # quantized weights keep their storage dtype
            model = model.to(self.dtype)
        if cfg.attn_implementation is not None:
            model.set_attn_implementation(cfg.attn_implementation)
        # K travels with the weights: the exported config.json carries it.
        latent = LatentConfig.from_tokenizer(processor.tokenizer, latent_size=cfg.latent_size)
        # feedback_norm too (None keeps the loaded model's saved rule).
        feedback = cfg.feedback_norm or get_latent_config(model).feedback_norm
        apply_latent_config(model, latent.replace(feedback_norm=feedback))
        return (model if quantize else model.to(self.device)), processor

    def prepare_policy(self, init: str | None) -> None:
        """`self.model` / `self.processor` from `init`, set up for training: vision tower frozen
        (model.freeze_vision; the reference freezes ViT + merger in every stage), LoRA adapters
        injected (model.lora; only they train), gradient checkpointing (model.
        gradient_checkpointing; non-reentrant, as the reference), train mode."""
        cfg = self.cfg.model
        self.init_path = init  # the model trained from (QLoRA export reloads it)
        self.model, self.processor = self.load_model(init, cfg.quantize)
        if cfg.freeze_vision:
            from monet_fast.model.arch import arch_of

            arch_of(self.model).visual(self.model).requires_grad_(False)
        self.peft_model = wrap_policy(self.model, cfg)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model, use_reentrant=False)
        self.model.train()

    # ---- engine, resume -----------------------------------------------------------------------

    def init_engine(self, module: nn.Module, optimizer, scheduler) -> None:
        """deepspeed.initialize with `self.ds_config` (kept in the run directory by rank 0)."""
        from monet_fast._optional import require

        deepspeed = require("deepspeed", "training")

        if not self.cfg.trainer.shared_filesystem:
            # Every node writes the model states next to its own ZeRO shards (no shared disk).
            self.ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
        if self.rank == 0:
            atomic_write_text(
                self.output / "deepspeed_config.json", json.dumps(self.ds_config, indent=2)
            )
        _quiet_deepspeed()
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.model = self.module.model  # ZeRO-3 may have re-registered parameters

    def resume_progress(
        self,
        fresh: ckpt.TrainingProgress,
        load: Callable[[Any, Path, str], ckpt.TrainingProgress],
    ) -> ckpt.TrainingProgress:
        """The run's progress record: `fresh` (built from the config) for a new run; with
        --resume, the checkpoint's (loaded into the engine by `load(engine, root, tag)`), whose
        position is kept while seed, data and batch sizes come from the config (differences are
        logged)."""
        if self.resume is None:
            return fresh
        leader = ckpt.is_leader(self.rank, self.dist.local_rank, self.cfg.trainer.shared_filesystem)
        root, tag = ckpt.resolve_resume(self.ckpt_root, self.resume, leader=leader)
        saved = load(self.engine, root, tag)
        for note in ckpt.compare_progress(saved, fresh):
            logger.warning("resume: %s", note)
        if self.rank == 0:
            logger.info(
                "resumed %s/%s at step %d (position from the checkpoint; seed, data and batch "
                "sizes from the config)",
                root,
                tag,
                saved.global_step,
            )
        for name in ("seed", "global_batch_size", "dataset_fingerprint", "n_samples", "world_size"):
            setattr(saved, name, getattr(fresh, name))
        return saved

    # ---- the run ------------------------------------------------------------------------------

    def setup(self) -> None:  # pragma: no cover (each recipe has its own)
        raise NotImplementedError

    def train(self) -> Any:  # pragma: no cover (each recipe has its own)
        raise NotImplementedError

    def run(self) -> Any:
        """setup() + train() + cleanup()."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()

    # ---- checkpoints and export ---------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.progress,
            keep_last=self.cfg.trainer.keep_last,
            rank=self.rank,
            local_rank=self.dist.local_rank,
            shared_filesystem=self.cfg.trainer.shared_filesystem,
        )
        if self.metrics is not None:
            self.metrics.event("checkpoint", step=self.progress.global_step, path=str(path))
        return path

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Write the current weights as a Hugging Face directory (default <output>/hf)."""
        path = Path(path) if path is not None else self.output / ckpt.EXPORT_DIR
        if self.peft_model is not None:
            # LoRA: adapters merged into a plain HF checkpoint, and saved alone beside it.
            export_lora(
                self.peft_model,
                self.processor,
                path,
                self.output / ADAPTER_DIR,
                zero_stage=self.zero_stage,
                rank=self.rank,
                # QLoRA: merge onto the full-precision init model (quantized weights can't be
                # written as a plain checkpoint).
                reload_base=(lambda: self.load_model(self.init_path)[0])
                if self.cfg.model.quantize
                else None,
            )
        else:
            ckpt.export_hf(
                self.model, self.processor, path, zero_stage=self.zero_stage, rank=self.rank
            )
        _barrier()
        if self.metrics is not None:
            self.metrics.event("export", step=self.progress.global_step, path=str(path))
        return path

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None


# --------------------------------------------------------------------------------------------
# Command-line entry (shared by `monet-fast train` / `rl` and their `python -m` forms)
# --------------------------------------------------------------------------------------------


def run_cli(run: Callable[[], Any], summary: Callable[[Any], str]) -> int:
    """Run a training entry point from the command line: INFO logging, `summary(result)` printed
    on rank 0, and the process group torn down however the run ends."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            print(summary(result))
        return 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def module_main(
    argv: list[str] | None,
    *,
    prog: str,
    command: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_from_args: Callable[[argparse.Namespace], int],
) -> int:
    """`python -m ...` entry of a recipe (torchrun / deepspeed launch it this way).

    Intermixed parsing: key=value overrides may come before, between or after the options.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"monet-fast {command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # deepspeed not installed: one line, not a traceback
        from monet_fast._optional import exit_missing_dependency

        return exit_missing_dependency(err, f"monet-fast {command}")


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config at INFO on every initialize; keep warnings only."""
    if os.environ.get("MONET_FAST_DS_VERBOSE") == "1":
        return
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


__all__ = ["RecipeBase", "module_main", "run_cli"]
