"""The compiled janus ops (csrc/): find them, or compile them on first use.

``load()`` tries, once per process:

1. the prebuilt ``janus._C`` (built by ``pip install --no-build-isolation``);
2. unless ``JANUS_BUILD_EXT=0``, an on-first-use build of the C++ sources with
   ``torch.utils.cpp_extension`` into
   ``$JANUS_CACHE_DIR/ext/<torch version>-<hash>`` (default cache dir
   ``~/.cache/janus``), guarded by a file lock so that concurrent processes
   build once. Later processes load the cached library directly.

Nothing here raises: a failure is recorded and reported by ``status()`` (and by
``python -m janus.info``), and the ops fall back to their references. Importing
this module is cheap; ``import janus`` does not import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import platform
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# File patterns of the on-first-use build (CUDA sources join only when usable, see _sources).
_CPP_GLOBS = ("*.cpp", "cpu/*.cpp")
_CUDA_GLOBS = ("cuda/*.cu",)
_HEADER_GLOBS = ("*.h", "cpu/*.h", "cuda/*.h", "cuda/*.cuh")
# Makes only the prebuilt janus._C an importable Python module; not needed when loading by path.
_PYTHON_MODULE_SOURCE = "python_module.cpp"
_LIB_NAME = "janus_ops"

_lock = threading.RLock()
_state: tuple[types.ModuleType | None, str] | None = None
_when_loaded: list[Callable[[], None]] = []


_OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()


def load() -> types.ModuleType | None:
    """The janus op namespace ``torch.ops.janus`` with the compiled ops registered, or None.

    The first call finds or builds the extension (a build takes tens of seconds);
    later calls return the recorded result. Never raises: see ``status()`` for why
    it is None.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            if _state[0] is not None:
                while _when_loaded:
                    _run_hook(_when_loaded.pop(0))
        return _state[0]


def status() -> tuple[bool, str]:
    """(available, reason): whether the compiled ops are loaded and how, or why not.

    Loads them first if no call did yet (which may build them).
    """
    load()
    assert _state is not None
    module, reason = _state
    return module is not None, reason


def when_loaded(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn()`` once the compiled ops are loaded: now if they are, else right after ``load()`` loads them.

    For registrations that need the C++ op to exist, such as an op's fake
    implementation (``torch.library.register_fake``). Usable as a decorator; an
    error in ``fn`` is logged, not raised.
    """
    with _lock:
        _when_loaded.append(fn)
        if _state is None and "janus._C" in sys.modules:
            load()  # imported directly (import janus._C): record it, which runs the hooks; cheap
        elif _state is not None and _state[0] is not None:
            _run_hook(_when_loaded.pop())
    return fn


def _run_hook(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.warning("janus: %s failed after loading the compiled ops", getattr(fn, "__qualname__", fn), exc_info=True)


def source_dir() -> Path | None:
    """The folder holding the C++/CUDA sources: csrc/ of a checkout, or janus/csrc of an install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    """Root of on-first-use builds: $JANUS_CACHE_DIR/ext, default ~/.cache/janus/ext."""
    root = os.environ.get("JANUS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "janus"
    )
    return Path(root) / "ext"


def _load() -> tuple[types.ModuleType | None, str]:
    try:
        import torch
    except ImportError as e:  # janus needs torch; this keeps status() honest anyway
        return None, f"torch is not importable: {e}"

    prebuilt, prebuilt_error = None, ""
    try:
        prebuilt = importlib.import_module("janus._C")
    except ModuleNotFoundError as e:
        if e.name != "janus._C":
            prebuilt_error = f"prebuilt janus._C failed to import: {e}"
    except Exception as e:  # e.g. undefined symbols after a torch upgrade
        prebuilt_error = f"prebuilt janus._C failed to load ({_one_line(e)})"
    if prebuilt is not None:
        # Never load a second copy next to it: the janus namespace can be registered once per process.
        return torch.ops.janus, f"prebuilt janus._C ({getattr(prebuilt, '__file__', '?')}){_stale_note(prebuilt)}"

    if os.environ.get("JANUS_BUILD_EXT", "1") == "0":
        return None, "; ".join(filter(None, ["JANUS_BUILD_EXT=0 (no build on first use)", prebuilt_error]))
    try:
        path, how = _build_or_find()
        torch.ops.load_library(str(path))
    except Exception as e:
        return None, "; ".join(filter(None, [f"build on first use failed: {_one_line(e)}", prebuilt_error]))
    return torch.ops.janus, "; ".join(filter(None, [f"{how} ({path})", prebuilt_error]))


def _stale_note(module: types.ModuleType) -> str:
    """A note when a source is newer than the prebuilt library: a checkout edited after its editable install."""
    root, library = source_dir(), getattr(module, "__file__", None)
    # Only a checkout's csrc/: an installed copy's timestamps say nothing about the build order.
    if root is None or library is None or root != Path(__file__).resolve().parent.parent / "csrc":
        return ""
    try:
        built = Path(library).stat().st_mtime
        globs = _CPP_GLOBS + _HEADER_GLOBS + (_CUDA_GLOBS if _cuda_buildable() else ())  # .cu: built only then
        newer = [p for g in globs for p in root.glob(g) if p.stat().st_mtime > built]
    except OSError:
        return ""
    if not newer:
        return ""
    fix = "rebuild with `pip install --no-build-isolation -e .`"
    log.warning("janus: the prebuilt janus._C is older than %s; %s", newer[0], fix)
    return f"; stale: {newer[0].relative_to(root)} is newer, {fix}"


def _sources(root: Path) -> list[Path]:
    """C++ sources, plus CUDA ones when torch has CUDA and nvcc is found."""

    paths = [p for g in _CPP_GLOBS for p in sorted(root.glob(g)) if p.name != _PYTHON_MODULE_SOURCE]
    cuda = [p for g in _CUDA_GLOBS for p in sorted(root.glob(g))]
    if cuda:
        if _cuda_buildable():
            paths += cuda
        else:
            log.info("janus: building the C++ ops only (torch without CUDA or nvcc not found)")
    return paths


def _cuda_buildable() -> bool:
    """Whether the CUDA sources are compiled too: torch has CUDA and nvcc is found (CUDA_HOME)."""
    import torch
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _build_or_find() -> tuple[Path, str]:
    """Path of the compiled library for these sources and this torch, building it if needed."""
    import torch
    from torch.utils import cpp_extension

    root = source_dir()
    if root is None:
        raise FileNotFoundError("C++ sources not found (expected csrc/ beside janus/ or janus/csrc/)")
    sources = _sources(root)
    key = hashlib.sha256()
    for part in (torch.__version__, torch.version.git_version, sys.implementation.cache_tag, platform.machine(),
                 " ".join(_OPENMP)):  # fmt: skip
        key.update(f"{part}\0".encode())
    for p in sources + [p for g in _HEADER_GLOBS for p in sorted(root.glob(g))]:
        key.update(f"{p.relative_to(root).as_posix()}\0".encode())
        key.update(p.read_bytes())
    build_dir = cache_dir() / f"{torch.__version__}-{key.hexdigest()[:16]}"
    library = build_dir / f"{_LIB_NAME}{'.pyd' if os.name == 'nt' else '.so'}"
    # Written after a complete build: the library itself appears while it is being linked.
    done = build_dir / "build.done"
    if done.is_file() and library.is_file():
        return library, "built on first use, cached"

    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "build.lock"):
        if done.is_file() and library.is_file():  # another process built it while we waited
            return library, "built on first use by another process"
        log.info("janus: compiling the C++ ops into %s (once per torch version and source change)", build_dir)
        t0 = time.perf_counter()
        try:
            cpp_extension.load(
                name=_LIB_NAME,
                sources=[str(p) for p in sources],
                # OpenMP on Linux: at::parallel_for in the CPU kernels is an OpenMP pragma (see setup.py).
                extra_cflags=["/O2"] if os.name == "nt" else ["-O3", *_OPENMP],
                extra_ldflags=list(_OPENMP),
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(root)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:
            (build_dir / "build-error.log").write_text(str(e), encoding="utf-8")
            raise RuntimeError(f"{_one_line(e)} (full log: {build_dir / 'build-error.log'})") from e
        if not library.is_file():
            raise FileNotFoundError(f"the build finished but {library} is missing")
        done.write_text(f"{library.name}\n", encoding="utf-8")
        log.info("janus: compiled the C++ ops in %.1f s", time.perf_counter() - t0)
    return library, f"built on first use in {time.perf_counter() - t0:.1f} s"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (advisory; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _one_line(error: BaseException) -> str:
    """A short description of an error: its type and first meaningful line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # Compiler failures put the useful line ("error: ...") after ninja's preamble.
    for line in lines:
        if "error:" in line:
            text = line
            break
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}"
