"""Showing latent blocks in decoded text.

`collapse_latent_spans` is the reference's `replace_abs_vis_token_content` post-processing
(REFERENCE.md §6, oracle 20): everything between `<abs_vis_token>` and `</abs_vis_token>` becomes
one marker. `render_latent_text` renders generated ids with each block shown as
`<abs_vis_token>⟨K latents⟩</abs_vis_token>` (what `monet-fast generate` streams).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from monet_fast.model.tokens import LATENT_END, LATENT_START

_SPAN = re.compile(re.escape(LATENT_START) + r"(.*?)" + re.escape(LATENT_END), flags=re.DOTALL)


def collapse_latent_spans(text: str, marker: str = "<latent>") -> str:
    """Replace the content of every `<abs_vis_token>...</abs_vis_token>` span by `marker`."""
    return _SPAN.sub(lambda m: LATENT_START + marker + LATENT_END, text)


def render_latent_text(
    ids: Sequence[int],
    tokenizer,
    slot_id: int,
    start_id: int,
    end_id: int,
    start_is_latent: bool = False,
) -> str:
    """Decode `ids`, showing each latent block as `<abs_vis_token>⟨n latents⟩</abs_vis_token>`.

    n = the `slot_id` steps of the block, plus one when START's own input row is a latent (the
    monet_vllm layout: `start_is_latent=True`). A block still open at the end of `ids` is shown
    without its END.
    """
    pieces: list[str] = []
    text_run: list[int] = []
    i = 0
    ids = list(ids)
    while i < len(ids):
        tok = ids[i]
        if tok != start_id:
            text_run.append(tok)
            i += 1
            continue
        if text_run:
            pieces.append(tokenizer.decode(text_run, skip_special_tokens=False))
            text_run = []
        j = i + 1
        while j < len(ids) and ids[j] == slot_id:
            j += 1
        closed = j < len(ids) and ids[j] == end_id
        n = j - i - 1 + int(start_is_latent)
        pieces.append(f"{LATENT_START}⟨{n} latents⟩" + (LATENT_END if closed else ""))
        i = j + 1 if closed else j
    if text_run:
        pieces.append(tokenizer.decode(text_run, skip_special_tokens=False))
    return "".join(pieces)
