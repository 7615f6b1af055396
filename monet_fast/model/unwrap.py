"""`unwrap`: the transformers model inside a peft wrapper.

A leaf module (it imports nothing of the package and never imports peft), so that every layer
that may receive a LoRA-wrapped model (the architecture adapters, the latent forward, the
decoder, rollouts) can unwrap it without importing `model/lora.py`, which imports loading.
"""

from __future__ import annotations

import sys
from typing import Any


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (PeftModel or a LoRA tuner), else `model`.

    peft injects its layers into the wrapped model, so the unwrapped model runs *with* the
    adapters; only the wrapper's attribute paths differ. Does not import peft.
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    if isinstance(model, peft.PeftModel):
        return model.get_base_model()
    if isinstance(model, peft.tuners.tuners_utils.BaseTuner):
        return model.model
    return model
