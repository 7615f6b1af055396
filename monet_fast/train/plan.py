"""`monet-fast plan`: predicted peak GPU memory per GPU of a training stage, and settings that fit.

Pure arithmetic over the model's dimensions; nothing is loaded. All sizes are bytes, per GPU.
Symbols: H hidden, L layers, I MLP width, V vocabulary, nh / nkv attention / key-value heads,
d head size (the config's explicit head_dim, Qwen3-VL; else H/nh), A = nh·d the attention width,
kvH = nkv·d, b bytes per element of the compute dtype (2 bf16, 4 fp32), N GPUs, B micro-batch
(samples per GPU per forward), S tokens per sample, P parameters (P_t trainable).

* weights     P·b (ZeRO-3: P·b/N plus two gathered decoder layers); 4bit/8bit QLoRA bases 0.5/1
              byte per frozen weight.
* gradients   P_t·b (ZeRO-2/3 partition them: /N).
* optimizer   P_t·(4 + 4 + m)/N: AdamW's two fp32 moments plus the fp32 master copy DeepSpeed
              keeps when training in bf16 (m = 4, 0 in fp32); 0 on the GPU with --offload.
* activations saved for backward, counted per decoder layer per token from the tensors
              Qwen2's decoder layer (HF, sdpa) keeps: 6·H + 4·A + 4·I elements of b bytes (norm
              inputs and outputs, q after RoPE, repeated k/v, attention output, the MLP's gate,
              up, silu(gate) and product) + 4·(nh + 2) bytes (fp32 log-sum-exp and RMSNorm
              rsqrt); Qwen3's q/k RMSNorm adds its inputs and outputs, 2·(A + kvH) elements, and
              an fp32 rsqrt per head, 4·(nh + nkv) bytes:
                  A_layer = B·S·[(6H + 4A + 4I)·b + 4(nh + 2)]   (A = H without head_dim)
              Stages 2/3 and VLPO run segment by segment over a KV cache: every latent step saves
              the concatenated cache (2·kvH per cached token) and each text segment after latent
              steps the cache and its GQA repeat (2·kvH + 2·A), bounded by prefix <= S:
                  A_seg = B·S·b·[2·kvH·n_lat + (2·kvH + 2·A)·n_blocks]
              With gradient checkpointing each layer keeps its input (H) and its KV cache (2·kvH
              in stages 2/3) and one layer is recomputed at a time:
                  A_ckpt = L·B·S·b·(H + 2·kvH·[segmented]) + A_layer + A_seg/L
              Non-layer terms (embeddings, final norm) are left out (< one layer). The frozen
              vision tower runs without grad: no saved activations.
* logits      R target rows (B·S·target_fraction) at full vocabulary: the fp32 log-softmax kept
              for backward plus its fp32 gradient, R·V·8, plus the lm_head input R·H·b; chunked
              CE (chunk c): c·V·8 + R·(H·b + 4).
* teacher     stage 2/3 with teacher.mode online: a second full model, P·b (cache: 0).
* reference   VLPO's frozen KL reference (ref.mode): copy P·b, zero3 P·b/N, offload 0 at the
              update's peak (moved in to score before the update; that earlier peak is not
              modelled), none 0; 0 with LoRA (the base with adapters disabled).
* overhead    CUDA context, NCCL buffers and allocator fragmentation: 2 GiB + 5 % of the rest
              (an assumption, not measured here).

Validated against measured tensors at reduced depth and width on CPU in tests/test_plan.py.
The search's relative costs (checkpointing 1.33x the step time, chunked CE 1.05x, ZeRO-3 1.15x,
offload 2x, LoRA last: it changes what is trained) are rough rules, not measurements.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GiB = 2**30
STAGES = ("1", "2", "3", "vlpo")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANT_BYTES = {None: None, "4bit": 0.5, "8bit": 1.0}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the formulas need (text decoder + vision tower). `arch` picks the layer
    layouts whose parameters are counted (`monet_fast.model.arch` model types)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: hidden // heads (Qwen2.5-VL has no head_dim field)
    arch: str = "qwen2_5_vl"
    attention_bias: bool = False  # Qwen3-VL: biases on q/k/v/o (Qwen2.5-VL: q/k/v always)
    vision_patch: int = 14
    vision_positions: int = 0  # Qwen3-VL: learned ViT position embeddings
    deepstack_levels: int = 0  # Qwen3-VL: extra mergers, one per DeepStack level

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {list(_ARCHS)}, got {self.arch!r}")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim else self.hidden // self.heads

    @property
    def attn_hidden(self) -> int:
        """Query / attention-output width, nh·d (= hidden unless head_dim says otherwise)."""
        return self.heads * self.head_size

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3_vl"

    def text_params(self) -> int:
        h, a, kv, i = self.hidden, self.attn_hidden, self.kv_hidden, self.intermediate
        if self.arch == "qwen3_vl":
            # q/k/v/o biased only with attention_bias; q/k RMSNorm weights of head size.
            bias = (a + 2 * kv + h) if self.attention_bias else 0
            attn = h * a + 2 * h * kv + a * h + bias + 2 * self.head_size
        else:  # q/k/v carry biases in Qwen2; o does not
            attn = (h * a + a) + 2 * (h * kv + kv) + a * h
        layer = attn + 3 * h * i + 2 * h  # the MLP has no biases; two RMSNorm weights
        heads = 1 if self.tie_embeddings else 2
        return heads * self.vocab * h + self.layers * layer + h

    def vision_params(self) -> int:
        v, vi, h, p = self.vision_hidden, self.vision_intermediate, self.hidden, self.vision_patch
        patch = 3 * 2 * p * p * v  # Conv3d over temporal 2 x p x p
        attn = (3 * v * v + 3 * v) + (v * v + v)
        fcs = (4 * v) * (4 * v) + 4 * v + 4 * v * h + h  # the merger's MLP over 2x2 patches
        if self.arch == "qwen3_vl":
            # LayerNorms, a plain GELU MLP with biases, a biased patch Conv3d, learned positions;
            # the final merger normalises before the 2x2 shuffle (v), DeepStack's after (4v).
            block = attn + (2 * v * vi + vi + v) + 4 * v
            mergers = (2 * v + fcs) + self.deepstack_levels * (8 * v + fcs)
            return patch + v + self.vision_positions * v + self.vision_depth * block + mergers
        block = attn + (3 * v * vi + 2 * vi + v) + 2 * v  # gated MLP, RMSNorms
        return patch + self.vision_depth * block + (v + fcs)

    def params(self) -> int:
        return self.text_params() + self.vision_params()

    def lora_params(self, r: int) -> int:
        h, a, kv, i = self.hidden, self.attn_hidden, self.kv_hidden, self.intermediate
        per_layer = r * ((h + a) + 2 * (h + kv) + (a + h) + 2 * (h + i) + (i + h))
        return self.layers * per_layer


# The architectures whose layer layouts text_params / vision_params count (a third needs its own).
_ARCHS = ("qwen2_5_vl", "qwen3_vl")

QWEN2_5_VL_7B = ModelDims(
    hidden=3584,
    layers=28,
    intermediate=18944,
    vocab=152064,
    heads=28,
    kv_heads=4,
    vision_hidden=1280,
    vision_depth=32,
    vision_intermediate=3420,
)

# Qwen/Qwen3-VL-8B-Instruct config.json (see GEOMETRIES["qwen3_vl_8b"] in model/tiny.py).
QWEN3_VL_8B = ModelDims(
    hidden=4096,
    layers=36,
    intermediate=12288,
    vocab=151936,
    heads=32,
    kv_heads=8,
    vision_hidden=1152,
    vision_depth=27,
    vision_intermediate=4304,
    head_dim=128,
    arch="qwen3_vl",
    vision_patch=16,
    vision_positions=2304,
    deepstack_levels=3,
)

PRESETS = {"qwen2_5_vl_7b": QWEN2_5_VL_7B, "qwen3_vl_8b": QWEN3_VL_8B}


@dataclass(frozen=True)
class Settings:
    """One training configuration the plan is computed for."""

    stage: str = "1"
    gpus: int = 8
    gpu_gib: float = 80.0
    seq_len: int = 2048  # tokens per sample (VLPO: prompt + response)
    micro_batch: int = 1  # samples per GPU per forward (VLPO: responses)
    dtype: str = "bf16"
    zero: int = 2
    offload: bool = False  # optimizer state on the CPU (DeepSpeed offload_optimizer)
    checkpointing: bool = False
    ce_chunk: int = 0  # 0 = full-vocabulary logits
    lora: int = 0  # LoRA rank; 0 = full fine-tuning
    quantize: str | None = None  # 4bit | 8bit (QLoRA)
    teacher: str = "online"  # stages 2/3: online | cache
    ref: str = "copy"  # VLPO reference (ref.mode): copy | zero3 | offload | none
    latent_size: int = 8  # K latent steps per latent block
    latent_blocks: int = 1  # latent blocks per sample
    target_fraction: float = 0.5  # share of tokens carrying loss (VLPO: the response)
    train_vision: bool = False


def _check(s: Settings) -> None:
    if s.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {s.stage!r}")
    if s.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {s.dtype!r}")
    if s.zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {s.zero!r}")
    if s.quantize not in QUANT_BYTES:
        raise ValueError(f"quantize must be 4bit, 8bit or None, got {s.quantize!r}")
    if s.quantize and not s.lora:
        raise ValueError("quantize needs lora > 0 (QLoRA trains adapters only)")
    if s.ref not in REF_COST:
        raise ValueError(f"ref must be one of {sorted(REF_COST)}, got {s.ref!r}")
    if s.teacher not in ("online", "cache"):
        raise ValueError(f"teacher must be online or cache, got {s.teacher!r}")
    for name in ("gpus", "seq_len", "micro_batch"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(s, name)!r}")


def activation_bytes(m: ModelDims, s: Settings) -> int:
    """Saved-for-backward bytes of the decoder stack (see the module docstring)."""
    b = DTYPE_BYTES[s.dtype]
    tokens = s.micro_batch * s.seq_len
    per_layer = tokens * (
        (6 * m.hidden + 4 * m.attn_hidden + 4 * m.intermediate) * b + 4 * (m.heads + 2)
    )
    if m.qk_norm:
        per_layer += tokens * (2 * (m.attn_hidden + m.kv_hidden) * b + 4 * (m.heads + m.kv_heads))
    segmented = s.stage != "1"
    seg = 0
    if segmented:
        n_lat = s.latent_size * s.latent_blocks
        seg = (
            tokens
            * b
            * (2 * m.kv_hidden * n_lat + (2 * m.kv_hidden + 2 * m.attn_hidden) * s.latent_blocks)
        )
    if not s.checkpointing:
        return m.layers * (per_layer + seg)
    cache = m.layers * tokens * b * 2 * m.kv_hidden if segmented else 0  # live KV cache
    return checkpoint_inputs_bytes(m, s) + cache + per_layer + seg


def checkpoint_inputs_bytes(m: ModelDims, s: Settings) -> int:
    """What gradient checkpointing keeps per layer: its input hidden states, L·B·S·H·b."""
    return m.layers * s.micro_batch * s.seq_len * m.hidden * DTYPE_BYTES[s.dtype]


def logits_bytes(m: ModelDims, s: Settings, saved_only: bool = False) -> int:
    """Loss-head bytes; `saved_only` leaves out the fp32 logits gradient that exists only
    during backward (what the saved-tensor measurement sees)."""
    b = DTYPE_BYTES[s.dtype]
    rows = math.ceil(s.micro_batch * s.seq_len * s.target_fraction)
    per_row = 4 if saved_only else 8
    if s.ce_chunk:
        return (0 if saved_only else min(s.ce_chunk, rows) * m.vocab * 8) + rows * (
            m.hidden * b + 4
        )
    return rows * m.vocab * per_row + rows * m.hidden * b


def plan(m: ModelDims, s: Settings) -> dict:
    """Per-GPU bytes by term, the total with overhead, and whether it fits in `gpu_gib`."""
    _check(s)
    b = DTYPE_BYTES[s.dtype]
    n = s.gpus
    p_all = m.params()
    if s.lora:
        p_train = m.lora_params(s.lora)
        qb = QUANT_BYTES[s.quantize]
        # QLoRA quantises the decoder's linear weights; embeddings, head and vision stay in b.
        # (Decoder norms and biases are counted as quantised too: < 0.01 % of the weights.)
        linear = m.text_params() - (1 if m.tie_embeddings else 2) * m.vocab * m.hidden
        frozen = p_all if qb is None else p_all - linear
        weights = frozen * b + (0 if qb is None else linear * qb) + p_train * b
    else:
        p_train = m.text_params() + (m.vision_params() if s.train_vision else 0)
        weights = p_all * b
    if s.zero == 3:
        gathered = 2 * (m.text_params() - 2 * m.vocab * m.hidden) // m.layers * b
        weights = weights / n + gathered
    grads = p_train * b / (n if s.zero >= 2 else 1)
    master = 4 if b != 4 else 0
    optim = 0 if s.offload else p_train * (8 + master) / (n if s.zero >= 1 else 1)
    teacher = p_all * b if s.stage in ("2", "3") and s.teacher == "online" else 0
    reference = 0
    if s.stage == "vlpo" and not s.lora:
        reference = {"copy": p_all * b, "zero3": p_all * b / n}.get(s.ref, 0)
    terms = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": activation_bytes(m, s),
        "logits": logits_bytes(m, s),
        "teacher": teacher,
        "reference": reference,
    }
    subtotal = sum(terms.values())
    overhead = 2 * GiB + 0.05 * subtotal
    total = subtotal + overhead
    return {
        "settings": asdict(s),
        "params": p_all,
        "trainable_params": p_train,
        "terms_gib": {k: v / GiB for k, v in terms.items()},
        "overhead_gib": overhead / GiB,
        "total_gib": total / GiB,
        "fits": total <= s.gpu_gib * GiB,
    }


# Rough step-time factors for ranking settings (see the module docstring).
_COST = {"checkpointing": 1.33, "ce_chunk": 1.05, "zero3": 1.15, "offload": 2.0, "cache": 1.1}
SEARCH_CE_CHUNK = 512
# VLPO reference modes in the search, with rough costs (offload moves the copy in every step).
REF_COST = {"copy": 1.0, "zero3": 1.05, "offload": 1.2, "none": 1.0}


def cheapest(m: ModelDims, s: Settings) -> dict | None:
    """The plan of the lowest-cost settings that fit, searching ZeRO 2/3, offload, checkpointing,
    chunked CE, the stage 2/3 teacher (online or a precomputed cache, its pass counted as 1.1x)
    and micro-batch (down to 1; the rest by gradient accumulation); LoRA (r 16) only when nothing
    full-parameter fits."""
    best = None
    loras = [s.lora] if s.lora else [0, 16]
    teachers = (
        ("online", "cache") if s.stage in ("2", "3") and s.teacher == "online" else (s.teacher,)
    )
    refs = ("copy", "zero3", "offload") if s.stage == "vlpo" and s.ref == "copy" else (s.ref,)
    for lora in loras:
        for zero, off, ckpt, chunk, teacher, ref in itertools.product(
            (2, 3), (False, True), (False, True), (0, SEARCH_CE_CHUNK), teachers, refs
        ):
            for mb in range(s.micro_batch, 0, -1):
                cand = replace(
                    s,
                    zero=zero,
                    offload=off,
                    checkpointing=ckpt,
                    ce_chunk=chunk,
                    teacher=teacher,
                    ref=ref,
                    lora=lora,
                    micro_batch=mb,
                )
                cost = (
                    (_COST["zero3"] if zero == 3 else 1)
                    * (_COST["offload"] if off else 1)
                    * (_COST["checkpointing"] if ckpt else 1)
                    * (_COST["ce_chunk"] if chunk else 1)
                    * (_COST["cache"] if teacher != s.teacher else 1)
                    * (REF_COST[ref] if ref != s.ref and not lora else 1)
                    * (1 + 0.1 * math.log2(s.micro_batch / mb))
                )
                p = plan(m, cand)
                if p["fits"] and (best is None or cost < best[0]):
                    best = (cost, p)
                    break
        if best is not None:
            return best[1]
    return None


def dims_from_hf(cfg: dict, source: str) -> ModelDims:
    """ModelDims from a Qwen2.5-VL or Qwen3-VL config.json dict (text fields nested or at the
    top level); Qwen3-VL's explicit `head_dim` sets the attention width."""
    text = cfg.get("text_config") or cfg
    vis = cfg.get("vision_config")
    arch = "qwen3_vl" if str(cfg.get("model_type", "")).startswith("qwen3_vl") else "qwen2_5_vl"
    try:
        head_dim = text.get("head_dim")
        return ModelDims(
            hidden=int(text["hidden_size"]),
            layers=int(text["num_hidden_layers"]),
            intermediate=int(text["intermediate_size"]),
            vocab=int(text.get("vocab_size", cfg.get("vocab_size"))),
            heads=int(text["num_attention_heads"]),
            kv_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
            vision_hidden=int(vis["hidden_size"]),
            vision_depth=int(vis["depth"]),
            vision_intermediate=int(vis["intermediate_size"]),
            tie_embeddings=bool(
                cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            ),
            head_dim=int(head_dim) if head_dim else None,
            arch=arch,
            attention_bias=bool(text.get("attention_bias", False)),
            vision_patch=int(vis.get("patch_size", 14)),
            vision_positions=int(vis.get("num_position_embeddings", 0) or 0),
            deepstack_levels=len(vis.get("deepstack_visual_indexes") or ()),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: not a Qwen2.5-VL / Qwen3-VL config (missing {err})") from None


def tiny_dims(**overrides) -> ModelDims:
    """The built-in tiny model's dimensions (`monet_fast.model.tiny.tiny_config`; `arch=` as
    there)."""
    from monet_fast.model.tiny import tiny_config

    return dims_from_hf(tiny_config(**overrides).to_dict(), "tiny")


def resolve_model(spec: str) -> tuple[ModelDims, dict]:
    """`--model`: a preset (qwen2_5_vl_7b | qwen3_vl_8b) | tiny | a directory with config.json |
    a train YAML.

    Returns the dims and the settings the YAML fixes (stage, LoRA, ZeRO, checkpointing, ...)."""
    if spec in PRESETS:
        return PRESETS[spec], {}
    if spec == "tiny":
        return tiny_dims(), {"dtype": "fp32"}
    path = Path(spec)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--model {spec}: no config.json in the directory")
        return dims_from_hf(json.loads(cfg_path.read_text()), str(cfg_path)), {}
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _from_yaml(path)
    raise ValueError(
        f"--model {spec!r}: expected one of {sorted(PRESETS)}, tiny, a directory with "
        "config.json or a train config .yaml"
    )


def _from_yaml(path: Path) -> tuple[ModelDims, dict]:
    """Dims and settings of a train (stages 1-3) or VLPO YAML config, validated by its loader."""
    from monet_fast.train.config_schema import read_yaml_config

    raw, _ = read_yaml_config(path)  # a mapping (ConfigError naming the file otherwise)
    is_vlpo = "vlpo" in raw
    # A shipped config leaves model.init null (given by --init): plan needs only its dims.
    init = (raw.get("model") or {}).get("init")
    overrides = (
        []
        if init or (raw.get("model") or {}).get("tiny_seed") is not None
        else ["model.tiny_seed=0"]
    )
    if is_vlpo:
        from monet_fast.train.vlpo_config import load_rl_config

        cfg = load_rl_config(path, overrides)
        found = {
            "stage": "vlpo",
            "micro_batch": cfg.trainer.micro_batch_size,
            "ce_chunk": cfg.vlpo.ce_chunk_size,
            "ref": cfg.ref.mode,
        }
    else:
        from monet_fast.train.config import load_config

        cfg = load_config(path, overrides)
        found = {
            "stage": str(cfg.stage),
            "micro_batch": cfg.trainer.micro_batch_size,
            "ce_chunk": cfg.loss.ce_chunk_size,
            "teacher": "cache" if cfg.teacher.mode == "cache" else "online",
        }
    found.update(
        checkpointing=cfg.model.gradient_checkpointing,
        lora=cfg.model.lora.r if cfg.model.lora else 0,
        quantize=cfg.model.quantize,
        offload=cfg.deepspeed.offload_optimizer,
        latent_size=cfg.model.latent_size,
    )
    zero = cfg.deepspeed.zero_stage
    if zero is None and cfg.deepspeed.config:
        ds_path = cfg.resolved_deepspeed_json()
        if ds_path.is_file():
            zopt = json.loads(ds_path.read_text()).get("zero_optimization", {})
            zero = zopt.get("stage")
            device = (zopt.get("offload_optimizer") or {}).get("device", "none")
            found["offload"] = found["offload"] or device in ("cpu", "nvme")
    if isinstance(zero, int):
        found["zero"] = zero
    if init:
        return resolve_model(init)[0], found
    if cfg.model.tiny_seed is not None and overrides:
        # No model in the file: the planned model is the one --init will give. Shipped recipes
        # live under configs/<preset>/ (e.g. configs/qwen3_vl_8b/8x24gb/); else assume the 7B.
        named = [d.name for d in path.resolve().parents if d.name in PRESETS]
        return PRESETS[named[0]] if named else QWEN2_5_VL_7B, found
    # The file builds the tiny model (model.tiny_seed) for model.tiny_arch.
    return tiny_dims(arch=cfg.model.tiny_arch), {**found, "dtype": "fp32"}


def parse_gpus(text: str) -> tuple[int, float]:
    """'8x80GB' -> (8, 80.0); '80GB' -> (1, 80.0)."""
    t = text.strip().upper().removesuffix("GB").removesuffix("G")
    n, _, size = t.rpartition("X")
    try:
        return (int(n) if n else 1), float(size)
    except ValueError:
        raise ValueError(f"--gpus {text!r}: expected NxSIZEGB, e.g. 8x80GB or 1x24GB") from None


def format_plan(p: dict) -> str:
    s = p["settings"]
    head = (
        f"stage {s['stage']}  {s['gpus']}x{s['gpu_gib']:g}GB  seq {s['seq_len']}  micro-batch "
        f"{s['micro_batch']}  {s['dtype']}  ZeRO-{s['zero']}{' offload' if s['offload'] else ''}"
        f"  ckpt {'on' if s['checkpointing'] else 'off'}  ce_chunk {s['ce_chunk']}"
        f"  lora {s['lora'] or 'off'}"
        + (f"  teacher {s['teacher']}" if s["stage"] in ("2", "3") else "")
        + (f"  ref {s['ref']}" if s["stage"] == "vlpo" else "")
    )
    rows = [f"  {k:<12}{v:8.2f} GiB" for k, v in p["terms_gib"].items()]
    rows.append(f"  {'overhead':<12}{p['overhead_gib']:8.2f} GiB")
    rows.append(
        f"  {'total':<12}{p['total_gib']:8.2f} GiB  -> {'fits' if p['fits'] else 'does NOT fit'}"
    )
    return "\n".join([head, *rows])


def _run(args) -> int:
    dims, found = resolve_model(args.model)
    values = dict(found)
    n, gib = parse_gpus(args.gpus)
    values.update(gpus=n, gpu_gib=gib)
    for key, val in (
        ("stage", args.stage),
        ("seq_len", args.seq_len),
        ("lora", args.lora),
        ("zero", args.zero),
        ("micro_batch", args.micro_batch),
        ("dtype", args.dtype),
        ("teacher", args.teacher),
    ):
        if val is not None:
            values[key] = val
    if args.offload:
        values["offload"] = True
    if "stage" not in values:
        raise ValueError("--stage is required (1, 2, 3 or vlpo) unless the YAML config sets it")
    settings = Settings(**values)
    result = {"plan": plan(dims, settings), "cheapest": cheapest(dims, settings)}
    print(format_plan(result["plan"]))
    if result["cheapest"] is None:
        print(
            "cheapest that fits: nothing (even LoRA r16 with offload, checkpointing, micro-batch 1)"
        )
    elif not result["plan"]["fits"] or result["cheapest"]["settings"] != result["plan"]["settings"]:
        print("cheapest that fits:\n" + format_plan(result["cheapest"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predicted peak GPU memory per GPU of a training stage and the cheapest settings that fit")  # fmt: skip
    p.add_argument(
        "--model",
        required=True,
        help=f"{' | '.join(sorted(PRESETS))} | tiny | HF model dir | train YAML",
    )
    p.add_argument("--stage", choices=STAGES, default=None)
    p.add_argument("--gpus", default="8x80GB", help="NxSIZEGB (default 8x80GB)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 2048)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per GPU per forward")
    p.add_argument("--lora", type=int, default=None, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=None)
    p.add_argument("--offload", action="store_true", help="optimizer state on the CPU")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None)
    p.add_argument("--teacher", choices=("online", "cache"), default=None, help="stages 2/3")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=_run)


if __name__ == "__main__":  # pragma: no cover
    from monet_fast.cli import main

    sys.exit(main(["plan", *sys.argv[1:]]))
