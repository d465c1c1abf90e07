"""Triton kernels, installed and imported as ``janus.kernels``.

This folder sits at the top of the repository and is mapped to ``janus.kernels``
by setup.py (``package_dir``), so ``import janus.kernels`` works in editable and
regular installs. It holds the kernels of JANUS.md section 5: the fused
masked-token loss over the three distributions and the fused mask-predict update.

Each kernel module imports triton itself; this package does not, so importing it
is cheap and safe without triton. Kernels are not called directly: their host
launchers are registered as the "triton" backend of an op in ``janus.ops``, which
owns the reference implementation, the dispatch and the fallback. To run a kernel
on CPU (tests), set ``TRITON_INTERPRET=1`` before its module is imported.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (TRITON_INTERPRET=1; triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
