"""Train a Hugging Face Qwen2.5-VL with the block-sparse latent attention ("monet_latent").

What it shows: an ordinary PyTorch training loop over an HF model whose language model runs
monet_fast's Triton latent attention. The only additions to a plain HF loop are

  1. switching the text attention to "monet_latent" (the vision tower keeps its own), and
  2. passing the compact stage-2 mask `masked_rows` [B, L, 4] (int32, built from the token ids
     by `monet_fast.kernels.mask_from_ids`) as a forward kwarg; transformers hands it through
     the decoder layers to the attention function.

The batches are synthetic stage-2 samples (image, latent slots, observation) of
`monet_fast.data.synthetic`, tokenised by `monet_fast.data.collate`, on the tiny test model.
A plain loop is used rather than `transformers.Trainer` because `Trainer` needs the
`accelerate` package, which monet_fast does not depend on (and which is not installed here).

Run:  python examples/hf_trainer_latent_attention.py   (CPU: a few seconds, Triton interpreter)
Prints one line per step and a final "loss first=... last=..." line; the loss decreases.
"""

import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be on before kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from monet_fast.kernels import mask_from_ids  # noqa: E402

from monet_fast.data import collate  # noqa: E402
from monet_fast.data.synthetic import make_samples  # noqa: E402
from monet_fast.model.attention import use_latent_attention  # noqa: E402
from monet_fast.model.tiny import tiny_model  # noqa: E402

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
    "position_ids",
    "labels",
)
LATENT_TOKENS = ("<abs_vis_token>", "<abs_vis_token_pad>")  # Monet's latent start / slot tokens


def stage2_batches(processor, n_batches: int = 2, batch_size: int = 2) -> list[dict]:
    """Model inputs plus `masked_rows`, the compact stage-2 mask (each auxiliary image hidden
    from the rows after its latent block), built from the token ids alone as any data pipeline
    can; monet_fast's collate also returns it, equal, as batch["masked_rows"]."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", *LATENT_TOKENS)]
    samples = make_samples(n_batches * batch_size, seed=1)
    batches = []
    for i in range(n_batches):
        full = collate(samples[i * batch_size : (i + 1) * batch_size], processor, "stage2")
        batch = {k: getattr(full, k) for k in MODEL_INPUTS}
        batch["masked_rows"] = mask_from_ids(batch["input_ids"], *ids, batch["attention_mask"])
        batches.append(batch)
    return batches


def main(epochs: int = 3, lr: float = 2e-3) -> tuple[float, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, processor = tiny_model(seed=0)
    # Same as model.set_attn_implementation({"text_config": "monet_latent"}) after importing
    # monet_fast.model.attention (which registers the name with transformers).
    model = use_latent_attention(model).to(device).train()
    print("attention:", model.config.text_config._attn_implementation)
    batches = [{k: v.to(device) for k, v in b.items()} for b in stage2_batches(processor)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    losses = []
    for epoch in range(epochs):
        for i, batch in enumerate(batches):
            loss = model(**batch).loss  # HF shifts labels; masked_rows reaches the attention
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"epoch {epoch} batch {i} loss {loss.item():.4f}")
    first = sum(losses[: len(batches)]) / len(batches)
    last = sum(losses[-len(batches) :]) / len(batches)
    print(f"loss first={first:.4f} last={last:.4f}")
    return first, last


if __name__ == "__main__":
    main()
