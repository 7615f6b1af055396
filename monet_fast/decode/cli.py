"""`monet-fast generate`: latent-feedback decoding of one prompt from a saved checkpoint.

    monet-fast generate --model DIR --image PATH --prompt TEXT [--max-new-tokens N]
        [--latent-size K] [--latent-layout sft|monet_vllm] [--do-sample --temperature T
        --top-p P --seed S] [--device cuda] [--dtype bfloat16] [--latent-trace]

Streams the answer to stdout as it is decoded; each latent block is printed once it closes, as
`<abs_vis_token>⟨K latents⟩</abs_vis_token>`. A summary line goes to stderr. With
`--latent-trace`, a summary of every block follows the answer: per latent step the vector's L2
norm and its cosine to the previous step of the block (a collapsed block shows cosines near 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monet_fast.model.config import LATENT_LAYOUTS


class _Printer:
    """Streams one row's tokens as text, holding back a latent block until it closes."""

    def __init__(self, tokenizer, cfg, prefix: list[int], out=None) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        # monet_vllm: START's own row is a latent too, so a block shows one more than its slots.
        self.start_is_latent = cfg.layout == "monet_vllm"
        self.out = out or sys.stdout
        self.ids: list[int] = list(prefix)  # a prompt-final START is rendered with its block
        self.printed = ""

    def _render(self, ids: list[int]) -> str:
        from monet_fast.decode.text import render_latent_text

        return render_latent_text(
            ids,
            self.tokenizer,
            slot_id=self.cfg.slot_id,
            start_id=self.cfg.start_id,
            end_id=self.cfg.end_id,
            start_is_latent=self.start_is_latent,
        )

    def _emit(self, text: str) -> None:
        # Byte-level BPE can end mid-character ("\ufffd"); print that part once it is complete.
        text = text.rstrip("\ufffd")
        new = text[len(self.printed) :] if text.startswith(self.printed) else "\n" + text
        if new:
            self.out.write(new)
            self.out.flush()
        self.printed = text

    def __call__(self, row: int, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        ids = [i for i in self.ids if i not in self.cfg.eos_ids]
        cut = len(ids)
        if self.cfg.start_id in ids:
            last_start = len(ids) - 1 - ids[::-1].index(self.cfg.start_id)
            if self.cfg.end_id not in ids[last_start + 1 :]:
                cut = last_start  # the block is still open: its size is not known yet
        self._emit(self._render(ids[:cut]))

    def finish(self) -> None:
        self._emit(self._render([i for i in self.ids if i not in self.cfg.eos_ids]))
        self.out.write("\n")
        self.out.flush()


def format_latent_trace(latents, counts: list[int]) -> str:
    """One row's latent trace: `latents` [n_blocks, K, H] and the vectors used in each block."""
    import torch

    if not counts:
        return "latent trace: no latent block"
    lines = []
    for b, n in enumerate(counts):
        vecs = latents[b, :n].float()
        lines.append(f"latent trace, block {b + 1} ({n} steps):")
        for k in range(n):
            cos = "-"
            if k > 0:
                cos = f"{torch.nn.functional.cosine_similarity(vecs[k], vecs[k - 1], dim=0):+.4f}"
            lines.append(f"  step {k + 1}: norm {vecs[k].norm():.4g}  cos(prev) {cos}")
    return "\n".join(lines)


def prompt_text(processor, images: list[str], prompt: str, start_latent: bool = False) -> str:
    """The templated prompt `generate` decodes from: the images, then `prompt`, in a user turn.

    With the default system message this is the text training and eval render for a sample
    whose question is those images and `prompt` (`monet_fast.model.sequence.render_prompt`).
    """
    from monet_fast.model.tokens import LATENT_START

    content = [{"type": "image", "image": path} for path in images]
    content.append({"type": "text", "text": prompt})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return text + LATENT_START if start_latent else text


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from monet_fast.decode.config import resolve_config
    from monet_fast.decode.engine import decoder_for
    from monet_fast.model.loading import load_pretrained

    for image in args.image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {image!r} does not exist")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"model directory {args.model!r} does not exist")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    model, processor = load_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        latent_size=args.latent_size,
        latent_layout=args.latent_layout,
    )
    text = prompt_text(processor, args.image, args.prompt, start_latent=args.start_latent)
    options = dict(
        latent_size=args.latent_size,
        latent_layout=args.latent_layout,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_latent_blocks=args.max_latent_blocks,
        use_cuda_graphs=not args.no_cuda_graphs,
        check_every=args.check_every,
    )
    cfg = resolve_config(model, processor, max_new_tokens=args.max_new_tokens, **options)
    printer = _Printer(processor.tokenizer, cfg, prefix=[cfg.start_id] if args.start_latent else [])
    out = decoder_for(model, processor).generate(
        [{"text": text, "images": list(args.image)}],
        max_new_tokens=args.max_new_tokens,
        streamer=printer,
        return_latents=args.latent_trace,
        **options,
    )
    printer.finish()
    if args.latent_trace:
        print(format_latent_trace(out.latents[0], out.latent_counts[0]))
    n_tokens = len(out.sequences[0])
    n_blocks = printer.ids.count(cfg.start_id)
    print(
        f"[{n_tokens} tokens, {n_blocks} latent block(s) of K={cfg.latent_size} "
        f"({cfg.layout}), finish: {out.finish_reasons[0]}]",
        file=sys.stderr,
    )
    return 0


def register(subparsers) -> None:
    """Add `generate` to the `monet-fast` command line."""
    p = subparsers.add_parser(
        "generate",
        help="decode one prompt with latent feedback from a saved checkpoint (streams text)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="image file (repeatable)"
    )
    p.add_argument("--prompt", required=True, help="user question (chat template applied)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--latent-size", type=int, default=None, help="K (default: saved config)")
    p.add_argument(
        "--latent-layout", choices=LATENT_LAYOUTS, default=None, help="default: saved config"
    )
    p.add_argument("--max-latent-blocks", type=int, default=None)
    p.add_argument(
        "--start-latent", action="store_true", help="end the prompt with <abs_vis_token>"
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: saved dtype)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
    p.add_argument(
        "--check-every", type=int, default=4, help="decode steps between streamed updates"
    )
    p.add_argument(
        "--latent-trace",
        action="store_true",
        help="after the answer, print each latent step's norm and cosine to the previous step",
    )
    p.set_defaults(func=_cmd_generate)
