"""Backend dispatch for janus ops: a priority list per op, every refusal explained.

An op (``Op``) has backends in priority order, the last one always "reference"
(the pure-PyTorch specification, available everywhere). A call walks the list
and runs the first backend that is available on this machine and supports these
arguments; each backend can say why it cannot.

Forcing a backend, for every op that has it or for one op:

    JANUS_BACKEND=reference            # global; ops without that backend choose as usual
    JANUS_BACKEND_PAD_BATCH=cpp        # one op (its name in upper case)

A forced backend that cannot run raises ``BackendUnavailable`` with its reason;
an automatic choice falls back quietly and logs the reason once per op and
backend (logger ``janus.ops._dispatch``, level INFO). When nothing fits, the
error lists every backend's reason.

Registering an op (one file per op in janus/ops, see pad_batch.py):

    PAD_BATCH = register_op("pad_batch", [
        Backend("cpp", _pad_batch_cpp, available=extension_available, supports=all_on_cpu),
        Backend("reference", pad_batch_ref),
    ])

A Triton kernel from ``janus.kernels`` joins the same way, first in the list:
``Backend("triton", _launch, available=triton_available, supports=all_on_cuda)``
where ``_launch`` imports the kernel module on first call (never at import).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REFERENCE = "reference"
# (ok, why_not): why_not is "" when ok.
Verdict = tuple[bool, str]


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run, or no backend of an op can run these arguments."""


def always() -> Verdict:
    """Availability of a backend that runs everywhere (the reference)."""
    return True, ""


def extension_available() -> Verdict:
    """Whether the compiled janus ops are loaded (loads or builds them on first call)."""
    from janus import _ext

    ok, reason = _ext.status()
    return ok, ("" if ok else reason)


def compiled(op_name: str, device_type: str) -> Callable[[], Verdict]:
    """Availability of the compiled kernel of ``torch.ops.janus.<op_name>`` for "cpu" or "cuda" tensors.

    Needs the compiled ops loaded (``extension_available``), a kernel for that device
    inside them (CUDA kernels are built only when torch has CUDA and nvcc is found) and,
    for "cuda", a visible CUDA device. The verdict is computed once per process.
    """
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    verdict: list[Verdict] = []

    def available() -> Verdict:
        if not verdict:
            verdict.append(_compiled_verdict(op_name, key))
        return verdict[0]

    available.__qualname__ = f"compiled({op_name!r}, {device_type!r})"
    return available


def _compiled_verdict(op_name: str, key: str) -> Verdict:
    ok, why = extension_available()
    if not ok:
        return False, why
    import torch

    qualified = f"janus::{op_name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"):
            return False, (
                f"the loaded janus ops have no {op_name} (built from older sources?): "
                "rebuild with `pip install --no-build-isolation -e .`"
            )
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} has no CUDA, so the CUDA kernels were not compiled"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            return False, "nvcc was not found (set CUDA_HOME) when the ops were compiled: no CUDA kernels"
        return False, (
            "the loaded janus ops were built without CUDA kernels: "
            "rebuild with `pip install --no-build-isolation -e .` on a machine with nvcc"
        )
    if key == "CUDA" and not torch.cuda.is_available():
        return False, "no CUDA device visible"
    return True, ""


@functools.cache
def _triton_installed() -> bool:
    # A module search walks sys.path (about 40 us): once per process, not on every dispatch.
    return importlib.util.find_spec("triton") is not None


def triton_available() -> Verdict:
    """Whether Triton kernels can run: triton importable, and a CUDA device or TRITON_INTERPRET=1 (read at
    every call; whether triton is installed is looked up once)."""
    if not _triton_installed():
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (TRITON_INTERPRET is not set)"
    return True, ""


def all_on_cpu(*args: Any, **kwargs: Any) -> Verdict:
    """``supports`` predicate: every tensor argument is on the CPU."""
    return _all_on("cpu", args, kwargs)


def all_on_cuda(*args: Any, **kwargs: Any) -> Verdict:
    """``supports`` predicate: every tensor argument is on a CUDA device."""
    return _all_on("cuda", args, kwargs)


def _all_on(device_type: str, args: tuple, kwargs: dict) -> Verdict:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device.type != device_type:
            return False, f"needs {device_type} tensors, got one on {value.device}"
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: short name, used by JANUS_BACKEND[_<OP>] ("cpp", "triton", "reference").
        impl: the implementation; takes the op's arguments.
        available: () -> (ok, why_not): can it run on this machine at all. Called on
            every dispatch, so it must cache anything expensive itself.
        supports: (*args, **kwargs) -> (ok, why_not): can it run these arguments
            (device, dtype, shape limits). Default: everything.
    """

    name: str
    impl: Callable[..., Any]
    available: Callable[[], Verdict] = always
    supports: Callable[..., Verdict] | None = None

    def verdict(self, *args: Any, **kwargs: Any) -> Verdict:
        """(ok, why_not) for running these arguments on this machine."""
        ok, why = self.available()
        if not ok:
            return False, f"unavailable: {why}"
        if self.supports is not None:
            ok, why = self.supports(*args, **kwargs)
            if not ok:
                return False, f"unsupported: {why}"
        return True, ""


class Op:
    """A callable op: picks a backend per call (see the module docstring) and runs it."""

    def __init__(self, name: str, backends: Sequence[Backend]) -> None:
        names = [b.name for b in backends]
        if not backends or names[-1] != REFERENCE:
            raise ValueError(f"op {name!r}: the last backend must be {REFERENCE!r}, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"op {name!r}: duplicate backend names in {names}")
        self.name = name
        self.backends = tuple(backends)
        self.env_var = f"JANUS_BACKEND_{name.upper()}"
        self._logged: set[str] = set()

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={[b.name for b in self.backends]})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.select(*args, **kwargs).impl(*args, **kwargs)

    def backend(self, name: str) -> Backend:
        """The backend called ``name`` (for benchmarks and tests that compare backends)."""
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"op {self.name!r} has no backend {name!r}; it has {[b.name for b in self.backends]}")

    def forced(self) -> str | None:
        """The backend forced by JANUS_BACKEND_<OP>, else by JANUS_BACKEND if this op has it, else None."""
        name = os.environ.get(self.env_var)
        if name:
            self.backend(name)  # raises on a name this op does not have
            return name
        name = os.environ.get("JANUS_BACKEND")
        if name and any(b.name == name for b in self.backends):
            return name
        return None

    def may_use(self, name: str) -> bool:
        """Whether backend ``name`` is available here and no other backend is forced: what a caller that
        checked its arguments itself (a decoder's hot path) asks before calling that backend directly."""
        return (self.forced() or name) == name and self.backend(name).available()[0]

    def select(self, *args: Any, **kwargs: Any) -> Backend:
        """The backend that runs these arguments; raises BackendUnavailable if none can."""
        forced = self.forced()
        if forced is not None:
            backend = self.backend(forced)
            ok, why = backend.verdict(*args, **kwargs)
            if not ok:
                source = self.env_var if os.environ.get(self.env_var) else "JANUS_BACKEND"
                raise BackendUnavailable(f"{self.name}: backend {forced!r} forced by {source} is {why}")
            return backend

        reasons = []
        for backend in self.backends:
            ok, why = backend.verdict(*args, **kwargs)
            if ok:
                for skipped, skipped_why in reasons:
                    self._log_once(skipped, f"{self.name}: using {backend.name!r}; {skipped!r} is {skipped_why}")
                return backend
            reasons.append((backend.name, why))
        listing = "; ".join(f"{name}: {why}" for name, why in reasons)
        raise BackendUnavailable(f"{self.name}: no backend can run these arguments ({listing})")

    def status(self) -> list[tuple[str, bool, str]]:
        """[(backend, available, why_not)] in priority order, for this machine (not per call)."""
        out = []
        for backend in self.backends:
            ok, why = backend.available()
            out.append((backend.name, ok, why))
        return out

    def _log_once(self, backend: str, message: str) -> None:
        if backend not in self._logged:
            self._logged.add(backend)
            log.info(message)


_REGISTRY: dict[str, Op] = {}


def register_op(name: str, backends: Sequence[Backend]) -> Op:
    """Create the op ``name`` with ``backends`` in priority order and list it in ``registry()``."""
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name, backends)
    _REGISTRY[name] = op
    return op


def registry() -> dict[str, Op]:
    """Every registered op by name (janus.ops imports all op modules, so all are here)."""
    return dict(_REGISTRY)
