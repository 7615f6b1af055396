"""monet_fast: latent visual reasoning (Monet) for Qwen2.5-VL — training, decoding, evaluation.

Importing the package loads the compiled extension and fails with a "rebuild" message if it
was built against another torch (see `monet_fast._ext`).
"""

from monet_fast._ext import load_extension as _load_extension

__version__ = "0.1.0"

_C = _load_extension()

__all__ = ["__version__"]
