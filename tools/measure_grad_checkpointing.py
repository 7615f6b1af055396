"""Activation memory of the latent forward with and without cache-safe gradient checkpointing.

Qwen2.5-VL-7B width (hidden 3584, 28/4 heads, MLP 18944) at 2 text layers, random weights, fp32
on CPU; stage 2 (with teacher states) and stage 3 batches from `make_samples`. For each run it
counts the distinct storages (parameters excluded) the forward keeps for backward: tensors autograd saves
(`bench.train_step.saved_activation_mib`) plus, with checkpointing, the layer inputs the
checkpoints hold for their recompute (counted through a forward pre-hook on every layer).
Gradients of the two runs are compared too. Usage: python tools/measure_grad_checkpointing.py
"""

from __future__ import annotations

import sys

import torch

from monet_fast.data import collate, make_samples
from monet_fast.model.latent import latent_forward
from monet_fast.model.tiny import tiny_model


def measure(model, batch, teacher, checkpoint: bool) -> tuple[float, float, dict]:
    seen: dict[int, int] = {}

    def note(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    def pack(t):
        note(t)
        return t

    def pre_hook(module, args, kwargs):
        if checkpoint:  # what non-reentrant checkpoint keeps for the recompute
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, tuple) else (a,):
                    note(t)

    hooks = [
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    model.zero_grad()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = latent_forward(model, batch, teacher=teacher, checkpoint=checkpoint)
    finally:
        for h in hooks:
            h.remove()
    # Parameters are saved by every matmul but are no activations: leave them out.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in params) / 2**20
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return saved, out.loss.item(), grads


def main() -> int:
    torch.manual_seed(0)
    model, processor = tiny_model(
        0, latent_size=8, geometry="qwen2_5_vl_7b", intermediate_size=18944
    )
    model = model.float().train()
    model.model.visual.requires_grad_(False)
    print("| stage | tokens | saved MiB plain | saved MiB checkpointed | drop | max grad diff |")
    print("|---|---|---|---|---|---|")
    for stage in ("stage2", "stage3"):
        batch = collate(make_samples(2, seed=1), processor, stage, latent_size=8)
        with torch.no_grad():
            st = latent_forward(model, batch, return_states=True)
        teacher = st.obs_states if stage == "stage2" else st.slot_states
        plain, loss0, g0 = measure(model, batch, teacher, checkpoint=False)
        ckpt, loss1, g1 = measure(model, batch, teacher, checkpoint=True)
        diff = max(
            (g1[n] - g0[n]).abs().max().item() / (g0[n].abs().max().item() + 1e-30) for n in g0
        )
        assert loss0 == loss1, (loss0, loss1)
        tokens = int(batch.attention_mask.sum())
        print(
            f"| {stage} | {tokens} | {plain:.0f} | {ckpt:.0f} | {plain / ckpt:.1f}x | {diff:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
