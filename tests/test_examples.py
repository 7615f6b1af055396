"""The drop-in recipes under examples/ run (in-process, tiny model) and do what they claim."""

from __future__ import annotations

import importlib
import math
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> dict:
    """The example's globals, without running its __main__ block."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{Path(name).stem}")


@pytest.mark.slow  # ~20 s of CPU on 2 cores: 4 train steps under the Triton interpreter
def test_hf_loop_trains_with_latent_attention_and_stage2_mask(monkeypatch, capsys):
    """The plain HF loop runs "monet_latent" with the stage-2 intervals (not only padding)
    reaching the kernel, and the loss goes down."""
    attention = importlib.import_module("monet_fast.model.attention")
    padding = torch.tensor(attention._kernels().PADDING_COLUMN, dtype=torch.int32)
    stage2_columns = []
    kernel = attention.latent_attention

    def spy(q, k, v, masked_rows, *args, **kwargs):
        rows = masked_rows.cpu()
        real = ~(rows == padding).all(-1)  # columns that are not padding
        stage2_columns.append(int((rows[real] != 0).any(-1).sum()))
        return kernel(q, k, v, masked_rows, *args, **kwargs)

    monkeypatch.setattr(attention, "latent_attention", spy)
    example = load_example("hf_trainer_latent_attention.py")
    first, last = example["main"](epochs=2)
    out = capsys.readouterr().out
    assert "attention: monet_latent" in out
    assert f"loss first={first:.4f} last={last:.4f}" in out
    assert len(stage2_columns) == 2 * 4  # 2 layers x 4 steps
    assert min(stage2_columns) > 0, "the stage-2 mask did not reach the attention"
    assert math.isfinite(first) and last < first - 0.1
    # The mask built from ids alone is collate's (what the recipes train with).
    from monet_fast.data import collate
    from monet_fast.data.synthetic import make_samples
    from monet_fast.model.tiny import tiny_processor

    processor = tiny_processor()
    batches = example["stage2_batches"](processor)
    samples = make_samples(4, seed=1)
    for i, batch in enumerate(batches):
        expect = collate(samples[2 * i : 2 * i + 2], processor, "stage2").masked_rows
        assert torch.equal(batch["masked_rows"], expect)
        assert (expect[..., 1] > expect[..., 0]).any()  # the batch has stage-2 intervals


def test_grpo_latent_term_equals_reference_and_improves_the_objective(capsys):
    stats = load_example("grpo_latent_term.py")["main"]()
    out = capsys.readouterr().out
    assert f"latent_steps {stats['latent_steps']}" in out
    assert stats["latent_steps"] == 4 * 8  # G=4 rollouts x one block of K=8 latents
    assert stats["token_steps"] > 0
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["latent_max_diff"] < 1e-5
    assert stats["latent_grad_max_diff"] < 1e-6
    assert stats["latent_grad_norm"] > 1e-3  # the latent term does push mu
    assert stats["loss_after"] < stats["loss"]


@pytest.mark.parametrize("name", ["hf_trainer_latent_attention.py", "grpo_latent_term.py"])
def test_examples_are_short_and_documented(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""') and "Run:" in text
    assert len(text.splitlines()) <= 130


@pytest.mark.slow  # 15-25 s on 2 CPU cores: Dynamo + AOTAutograd trace of the tiny model
def test_compile_step_one_graph_with_both_ops(capsys):
    """torch.compile(fullgraph=True) of a decoder step with the latent attention and the latent
    policy loss: one graph (no break), both custom ops in it, same loss and grads as eager."""
    result = load_example("compile_step.py")["main"]("aot_eager")
    out = capsys.readouterr().out
    assert result["graphs"] == 1
    assert result["ops"] == ["monet_fast.latent_attention_fwd", "monet_fast.latent_policy_loss_fwd"]
    assert "graphs=1 ops=monet_fast.latent_attention_fwd,monet_fast.latent_policy_loss_fwd" in out
    assert math.isfinite(result["loss"]) and result["n_grads"] > 10
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-5
