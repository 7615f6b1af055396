"""torch.compile a training step that uses both monet_fast custom ops, with no graph break.

What it shows: the decoder of a Qwen2.5-VL running the block-sparse latent attention
("monet_latent", op `monet_fast::latent_attention_fwd`) plus a VLPO-style latent policy term
(`monet_fast::latent_policy_loss_fwd`) on the hidden states at the latent slots, compiled with
`torch.compile(fullgraph=True)`. The ops are registered with torch.library (fake impls and
autograd formulas), so Dynamo keeps each one as a single node and AOTAutograd puts their
backward ops in the backward graph.

The vision tower runs eagerly before the compiled step (its patch bookkeeping is data
dependent); the step takes the merged input embeddings. The compact stage-2 mask comes from
token ids via `monet_fast.kernels.mask_from_ids` (no collate needed for it). The batch is two
synthetic stage-2 samples on the tiny test model.

Run:  python examples/compile_step.py [--backend aot_eager|inductor]
      (CPU default aot_eager, ~10 s with the Triton interpreter; inductor compiles C++, ~1 min)
Prints the monet_fast ops in the graph, the number of graphs (1 = no graph break), and the
largest loss / gradient difference between the compiled and the eager step.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be on before kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from monet_fast.kernels import latent_policy_loss, mask_from_ids  # noqa: E402

from monet_fast.data import collate  # noqa: E402
from monet_fast.data.synthetic import make_samples  # noqa: E402
from monet_fast.model.attention import use_latent_attention  # noqa: E402
from monet_fast.model.tiny import tiny_model  # noqa: E402
from monet_fast.model.tokens import TokenIds  # noqa: E402


def step(model, embeds, attention_mask, position_ids, masked_rows, labels, slot_idx, z, old_logp, adv):  # fmt: skip
    """CE on the text labels + the latent policy loss on the hidden states that predict each
    latent slot (position p - 1 predicts slot p, as in Monet)."""
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
        masked_rows=masked_rows,  # forward kwarg: reaches the "monet_latent" attention
    ).last_hidden_state  # fmt: skip
    logits = model.lm_head(hidden[:, :-1]).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    mu = hidden[slot_idx[0], slot_idx[1] - 1]  # [n_slots, D]: index tensors, static shape
    mask = torch.ones_like(adv, dtype=torch.bool)
    latent = latent_policy_loss(mu, z, old_logp, adv, mask, sigma=10.0).mean()
    return ce + latent


def prepare(device: str):
    torch.manual_seed(0)
    model, processor = tiny_model(seed=0)
    model = use_latent_attention(model).to(device).train()
    batch = collate(make_samples(2, seed=1), processor, "stage2", latent_size=4)
    tid = TokenIds.from_tokenizer(processor.tokenizer)
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    masked_rows = mask_from_ids(ids, tid.image_pad, tid.latent_start, tid.latent_pad, attn)
    with torch.no_grad():  # vision tower, eager: merge the image features into the embeddings
        embeds = model.model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(
            batch.pixel_values.to(device), batch.image_grid_thw.to(device)
        ).pooler_output
        image = (ids == tid.image_pad)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image, torch.cat(feats).to(embeds.dtype))
    slot_idx = batch.latent_slot_mask.to(device).nonzero().T  # [2, n_slots] (row, col)
    n_slots, width = slot_idx.shape[1], embeds.shape[-1]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n_slots, width, generator=g).to(device)  # "rollout" latents
    old_logp = -0.5 * z.square().sum(-1) / 100.0
    adv = torch.linspace(-1.0, 1.0, n_slots, device=device)
    labels = batch.labels.to(device)
    args = (embeds, attn, batch.position_ids.to(device), masked_rows, labels, slot_idx, z, old_logp, adv)  # fmt: skip
    return model, args


def run(model, fn, args) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(model, *args)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def main(backend: str | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = backend or ("inductor" if device == "cuda" else "aot_eager")
    model, args = prepare(device)
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm, example_inputs):  # records Dynamo's graph, then compiles with `backend`
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    eager_loss, eager_grads = run(model, step, args)
    compiled = torch.compile(step, backend=recording, fullgraph=True)  # raises on a graph break
    loss, grads = run(model, compiled, args)
    ops = sorted(
        {
            str(n.target).removesuffix(".default")
            for gm in graphs
            for n in gm.graph.nodes
            if str(n.target).startswith("monet_fast.")
        }
    )
    result = {
        "backend": backend,
        "graphs": len(graphs),
        "ops": ops,
        "loss": loss,
        "loss_diff": abs(loss - eager_loss),
        "grad_diff": max((a - b).abs().max().item() for a, b in zip(grads, eager_grads)),
        "n_grads": len(grads),
    }
    print(f"backend={backend} graphs={result['graphs']} ops={','.join(ops)}")
    print(f"loss={loss:.6f} |compiled - eager| loss={result['loss_diff']:.2e} grad={result['grad_diff']:.2e}")  # fmt: skip
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="torch.compile backend")
    main(parser.parse_args().backend)
