"""`monet-fast plan`: the memory model against measured bytes at reduced depth and width (CPU,
fp32): parameters, gradients and AdamW state from a real optimizer step, and the activations
autograd saves for backward (saved-tensor hooks, parameter storages excluded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from monet_fast.cli import main
from monet_fast.data import collate, make_samples
from monet_fast.model.latent import latent_forward
from monet_fast.model.tiny import tiny_model
from monet_fast.train.config import load_config
from monet_fast.train.plan import (
    PRESETS,
    QWEN2_5_VL_7B,
    QWEN3_VL_8B,
    Settings,
    activation_bytes,
    checkpoint_inputs_bytes,
    logits_bytes,
    parse_gpus,
    plan,
    resolve_model,
    tiny_dims,
)
from monet_fast.train.vlpo_config import load_rl_config

ROOT = Path(__file__).resolve().parents[1]

SIZE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
STAGE = {"1": "stage1", "2": "stage2"}
# Qwen3-VL's explicit head_dim, here unlike hidden / heads (as in Qwen3-VL-4B: 2560 / 32 != 128):
# 8 heads of 64 make the attention 512 wide over a 256-wide residual stream.
HEAD_DIM = {"head_dim": 64}


def test_param_count_matches_model():
    model, _ = tiny_model(seed=0, **SIZE)
    assert tiny_dims(**SIZE).params() == sum(p.numel() for p in model.parameters())
    assert abs(QWEN2_5_VL_7B.params() - 8.29e9) < 0.01e9  # Qwen2.5-VL-7B: 8.29 B parameters


def _measure(stage: str, arch: str = "qwen2_5_vl", **extra) -> tuple[dict[str, int], Settings]:
    model, proc = tiny_model(seed=0, arch=arch, **SIZE, **extra)
    model.train()
    model.model.visual.requires_grad_(False)  # frozen in SFT
    batch = collate(make_samples(2, seed=1), proc, STAGE[stage], latent_size=8)
    teacher = None
    if stage != "1":
        with torch.no_grad():
            teacher = latent_forward(model, batch, return_states=True).obs_states
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = latent_forward(model, batch, teacher=teacher)
    out.loss.backward()
    opt.step()
    bsz, seq = batch.input_ids.shape
    blocks = max(len(lay.latent_blocks) for lay in batch.layouts) if stage != "1" else 0
    settings = Settings(
        stage=stage,
        gpus=1,
        seq_len=seq,
        micro_batch=bsz,
        dtype="fp32",
        zero=0,
        latent_size=8,
        latent_blocks=blocks,
        target_fraction=int(out.n_target_tokens) / (bsz * seq),
        teacher="cache",
    )
    state = sum(
        v.untyped_storage().nbytes()
        for s in opt.state.values()
        for k, v in s.items()
        if k != "step"
    )
    measured = {
        "weights": sum(p.untyped_storage().nbytes() for p in model.parameters()),
        "gradients": sum(p.grad.untyped_storage().nbytes() for p in trainable),
        "optimizer": state,
        "activations": sum(saved.values()),
    }
    return measured, settings


@pytest.mark.parametrize(
    "stage, arch, extra",
    [
        ("1", "qwen2_5_vl", {}),
        ("2", "qwen2_5_vl", {}),
        ("1", "qwen3_vl", HEAD_DIM),
        ("2", "qwen3_vl", HEAD_DIM),
    ],
    ids=["1", "2", "qwen3-head_dim-1", "qwen3-head_dim-2"],
)
def test_prediction_within_15_percent_of_measured(stage, arch, extra):
    measured, s = _measure(stage, arch, **extra)
    dims = tiny_dims(arch=arch, **SIZE, **extra)
    p = plan(dims, s)
    predicted = {k: p["terms_gib"][k] * 2**30 for k in ("weights", "gradients", "optimizer")}
    predicted["activations"] = activation_bytes(dims, s) + logits_bytes(dims, s, saved_only=True)
    for key in ("weights", "gradients", "optimizer"):
        assert predicted[key] == pytest.approx(measured[key], rel=0.01), key
    # The activation model alone, not only the parameter-dominated total.
    assert predicted["activations"] == pytest.approx(measured["activations"], rel=0.15)
    assert sum(predicted.values()) == pytest.approx(sum(measured.values()), rel=0.15)


@pytest.mark.parametrize("extra", [{}, HEAD_DIM, {**HEAD_DIM, "attention_bias": True}])
def test_param_count_honours_qwen3_head_dim(extra):
    """Qwen3-VL: q/o are heads x head_dim wide, k/v kv_heads x head_dim, q/k RMSNorm, biases only
    with attention_bias; the vision tower's LayerNorms, plain MLP, learned positions and DeepStack
    mergers. Exact against the stock model; the 8B preset against its released size."""
    model, _ = tiny_model(seed=0, arch="qwen3_vl", **SIZE, **extra)
    dims = tiny_dims(arch="qwen3_vl", **SIZE, **extra)
    assert dims.params() == sum(p.numel() for p in model.parameters())
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q.shape[0] == dims.attn_hidden == 8 * extra.get("head_dim", 32)
    assert abs(QWEN3_VL_8B.params() - 8.77e9) < 0.01e9  # Qwen3-VL-8B-Instruct: 8.77 B parameters
    assert resolve_model("qwen3_vl_8b")[0] == QWEN3_VL_8B


def test_options_lower_the_terms_they_target():
    base = Settings(stage="2", gpus=8, gpu_gib=80, seq_len=2048)
    p0 = plan(QWEN2_5_VL_7B, base)["terms_gib"]
    ck = plan(QWEN2_5_VL_7B, Settings(**{**base.__dict__, "checkpointing": True}))["terms_gib"]
    ce = plan(QWEN2_5_VL_7B, Settings(**{**base.__dict__, "ce_chunk": 128}))["terms_gib"]
    lo = plan(QWEN2_5_VL_7B, Settings(**{**base.__dict__, "lora": 16, "stage": "vlpo"}))
    assert ck["activations"] < p0["activations"] / 5
    assert ce["logits"] < p0["logits"] / 4
    assert lo["terms_gib"]["reference"] == 0 and lo["terms_gib"]["optimizer"] < 0.1


def test_cli_json_and_cheapest(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", "qwen2_5_vl_7b", "--stage", "2", "--gpus", "8x24GB", "--json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert not result["plan"]["fits"]
    assert result["cheapest"]["fits"] and result["cheapest"]["total_gib"] <= 24
    assert "cheapest that fits" in capsys.readouterr().out


def test_cli_bad_gpus(capsys):
    assert main(["plan", "--model", "tiny", "--stage", "1", "--gpus", "eightx80"]) == 2
    assert "--gpus 'eightx80'" in capsys.readouterr().err


def _checkpoint_kept_bytes(layers: int) -> tuple[int, Settings]:
    """Bytes kept for backward by stage 2 with cache-safe checkpointing: saved tensors plus the
    layer inputs the checkpoints hold (seen through a forward pre-hook on every layer)."""
    from monet_fast._compat import enable_activation_checkpointing

    model, proc = tiny_model(seed=0, **{**SIZE, "num_hidden_layers": layers})
    model.train()
    model.model.visual.requires_grad_(False)
    batch = collate(make_samples(2, seed=1), proc, "stage2", latent_size=8)
    with torch.no_grad():
        teacher = latent_forward(model, batch, return_states=True).obs_states
    enable_activation_checkpointing(model, use_reentrant=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def note(t) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    def pre_hook(module, args, kwargs) -> None:
        for x in (*args, *kwargs.values()):
            note(x)

    layers_ = model.model.language_model.layers
    hooks = [la.register_forward_pre_hook(pre_hook, with_kwargs=True) for la in layers_]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latent_forward(model, batch, teacher=teacher)
    for h in hooks:
        h.remove()
    bsz, seq = batch.input_ids.shape
    s = Settings(stage="2", gpus=1, seq_len=seq, micro_batch=bsz, dtype="fp32", checkpointing=True)
    return sum(seen.values()), s


@pytest.mark.slow  # 1-16 s (two models, checkpointed forwards; slow when run first)
def test_checkpointing_keeps_layer_inputs_per_layer():
    # Per-layer slope (4 layers minus 2): what each checkpointed layer keeps is its input.
    kept2, s = _checkpoint_kept_bytes(2)
    kept4, _ = _checkpoint_kept_bytes(4)
    per_layer = checkpoint_inputs_bytes(tiny_dims(**SIZE), s) / SIZE["num_hidden_layers"]
    assert per_layer == pytest.approx((kept4 - kept2) / 2, rel=0.15)


FAMILIES = ("qwen2_5_vl_7b", "qwen3_vl_8b")
VARIANTS = sorted(p for f in FAMILIES for p in (ROOT / "configs" / f).glob("*/*.yaml"))
_GPUS = {"1x80gb_lora": "1x80GB", "8x24gb": "8x24GB"}


def test_variant_recipes_are_all_here():
    names = {f"{p.parent.parent.name}/{p.parent.name}/{p.name}" for p in VARIANTS}
    for family in FAMILIES:
        for variant in _GPUS:
            for stage in ("stage1", "stage2", "stage3", "vlpo"):
                assert f"{family}/{variant}/{stage}.yaml" in names


@pytest.mark.parametrize(
    "path", VARIANTS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}"
)
def test_variant_recipes_load_and_carry_the_plans_prediction(path):
    if path.stem == "vlpo":
        cfg = load_rl_config(path, ["model.init=/m"])
    else:
        stage = int(path.stem[-1])
        extra = ["teacher.model=/t"] if stage > 1 else []
        cfg = load_config(path, ["model.init=/m", *extra], stage=stage)
    assert cfg.resolved_deepspeed_json().is_file()
    if path.parent.name.endswith("lora"):
        assert cfg.model.lora is not None
    dims, found = resolve_model(str(path))
    # No model in the file (model.init is --init's): the plan takes configs/<preset>/'s dims.
    assert dims == PRESETS[path.parent.parent.name]
    n, gib = parse_gpus(_GPUS[path.parent.name])
    p = plan(dims, Settings(**found, gpus=n, gpu_gib=gib))
    assert p["fits"]
    # The comment's number is the planner's, so a formula change must update the recipes.
    stated = re.search(r"# plan: ([0-9.]+) GiB per GPU", path.read_text()).group(1)
    assert stated == f"{p['total_gib']:.1f}"


def test_a_yaml_that_is_not_a_config_mapping_is_refused_naming_the_file(tmp_path):
    from monet_fast.train.config_schema import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        resolve_model(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: a config must be a YAML mapping"):
        resolve_model(str(bad))
