"""autotune: a hardware-aware auto-tuner for transformer inference.

`from autotune import tune, TuneConfig, load_result, load_model`. The names are loaded on first use, so `autotune --help`
does not pay for importing torch and ONNX Runtime.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["tune", "TuneConfig", "TuneResult", "load_result", "load_model", "__version__"]

_LAZY = {"tune": "autotune.api", "load_result": "autotune.result", "TuneResult": "autotune.result", "TuneConfig": "autotune.config",
         "load_model": "autotune.predict"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
