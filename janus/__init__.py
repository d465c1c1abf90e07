"""janus: one Transformer that decodes autoregressively and non-autoregressively.

Importing janus is cheap: it imports neither triton nor the compiled extension,
and the decoding API (``fast_generate``, ``Generator``, ``DecodeConfig``,
``Hypothesis``) is loaded on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "fast_generate": "janus.api",
    "Generator": "janus.api",
    "DecodeConfig": "janus.config",
    "Hypothesis": "janus.decoding.types",
    "CanvasStep": "janus.decoding.types",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'janus' has no attribute {name!r}")


__all__ = ["CanvasStep", "DecodeConfig", "Generator", "Hypothesis", "__version__", "fast_generate"]
