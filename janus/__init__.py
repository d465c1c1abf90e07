"""janus: one Transformer that decodes autoregressively and non-autoregressively.

Importing janus is cheap: it imports neither triton nor the compiled extension.
"""

__version__ = "0.1.0"
