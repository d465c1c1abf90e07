"""Crash-safe training checkpoints: safetensors weights + JSON, no pickle.

Layout of ``save_dir``::

    save_dir/
      checkpoint_00001000/
        model.safetensors      model state_dict; tied tensors stored once (see below)
        optimizer.safetensors  every tensor of optimizer.state_dict() ("state.{i}.{name}")
        state.json             step, optimizer structure, trainer state (epoch, scheduler,
                               RNG, best validation, ...), size + sha256 of every other file
        config.json            whatever config dict the trainer passes (model, train, ...)
        spm.model              extra files the trainer passes (``files=``), copied verbatim
      checkpoint_00002000/
      latest.json              {"checkpoint": "checkpoint_00002000", "step": 2000}
      best.json                same shape, written when a save has ``is_best=True``

Why a checkpoint is never half-written (the property resume relies on):

1. Everything is written into ``save_dir/.tmp-checkpoint_{step:08d}-{pid}/``; each file
   is fsynced, then the folder is.
2. One ``os.rename`` gives the folder its final name, and ``save_dir`` is fsynced. A
   folder named ``checkpoint_*`` therefore only ever holds a complete checkpoint.
3. ``latest.json`` / ``best.json`` are replaced atomically (temp file, fsync,
   ``os.replace``). A crash between 2 and 3 leaves latest.json on the previous
   checkpoint, which is still complete, and resume restarts from there.
4. Pruning renames a folder to ``.tmp-delete-*`` before removing it, so a crash mid-delete
   never leaves a partial ``checkpoint_*`` behind. ``.tmp-*`` names are never loaded.

Re-saving a step that already exists (after resuming from an older checkpoint) moves the
old folder aside to ``.old-checkpoint_{step:08d}-{pid}`` for the two renames it takes to
swap in the new one; should a crash land exactly there, ``latest_checkpoint`` still finds
the old folder and the next save renames it back.

Tied weights: safetensors refuses tensors that share memory. Names whose tensor is the
very same view of another (an embedding shared with the output projection) are stored
once and listed in the file's metadata (``janus.aliases``); loading puts the shared
tensor back under every name so ``model.load_state_dict`` works unchanged. Other
overlapping views are stored as copies.

Every JSON value the trainer passes is stored with tuples and non-string dict keys
tagged (``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``), so what is
loaded back equals what was saved. Only one process may write to a ``save_dir``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "average_checkpoints",
    "capture_rng",
    "checkpoint_name",
    "last_checkpoints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "prune_checkpoints",
    "restore_optimizer",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
AVERAGE_FILE = "average.json"
LATEST_FILE = "latest.json"
BEST_FILE = "best.json"
_RESERVED = {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE, AVERAGE_FILE}

_NAME_RE = re.compile(r"^checkpoint_(\d+)$")
_OLD_RE = re.compile(r"^\.old-checkpoint_(\d+)-(\d+)$")
_PID_RE = re.compile(r"-(\d+)$")
_TMP = ".tmp-"
_OLD = ".old-"
_ALIASES_KEY = "janus.aliases"
_CONFIG_KEY = "janus.config"
_TAGS = ("__tuple__", "__items__", "__tensor__")
_CHUNK = 1 << 24


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint of update ``step`` (int >= 0): ``checkpoint_{step:08d}``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return f"checkpoint_{step:08d}"


# --------------------------------------------------------------------------- JSON


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Return a JSON-able copy of ``obj``; tensors go to ``tensors`` (keyed by their path) if given."""
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError(
                f"{where} is a torch.Tensor; checkpoint state and config must be plain JSON "
                "(convert it with .tolist() or .item())"
            )
        key = where
        while key in tensors:  # names containing dots could collide with nested paths
            key += "#"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, f"{where}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, where, None), _encode(v, f"{where}.{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which cannot be stored in a checkpoint "
        "(JSON values, tuples and tensors only; pickle is not used)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """Inverse of ``_encode``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if tag == "__tensor__":
            if tensors is None or value not in tensors:
                raise KeyError(f"tensor {value!r} is referenced in JSON but missing from the safetensors file")
            return tensors[value]
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- files


def _damaged(file: Path, what: str) -> ValueError:
    return ValueError(
        f"{file}: {what}. The checkpoint {file.parent} is damaged; delete that folder "
        f"(rm -r {file.parent}) to resume from the previous checkpoint."
    )


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of ``path``."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it; return its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}")
    try:
        _write_bytes(tmp, _json_bytes(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    """Parse ``path``; a missing, unreadable or malformed file raises ValueError naming it."""
    if not path.is_file():
        raise _damaged(path, "file is missing")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"not valid JSON ({e})") from None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing an existing ``final`` safely."""
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(parent)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first.
    aside = parent / f"{_OLD}{final.name}-{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    _fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)


def _pid_of(name: str) -> int | None:
    m = _PID_RE.search(name)
    return int(m.group(1)) if m else None


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _is_stale(name: str) -> bool:
    """A ``.tmp-*`` / ``.old-*`` entry left by a writer that is gone (or by this process, which is done with it)."""
    pid = _pid_of(name)
    return pid is not None and (pid == os.getpid() or not _pid_alive(pid))


# --------------------------------------------------------------------------- tensors


def _dedupe(tensors: Mapping[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into (tensors to store, {alias: stored name}), contiguous, on CPU.

    Identical views of the same memory (tied weights) are stored once; other overlapping
    views are copied, since safetensors refuses shared memory.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # exact view -> stored name
    storages: set[tuple] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: key {name!r} is not a str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.numel() == 0:
            unique[name] = t.to("cpu").contiguous().clone()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        if storage in storages:
            t = t.clone()
        storages.add(storage)
        unique[name] = t.to("cpu").contiguous()
    return unique, aliases


def _write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], metadata: dict[str, str]
) -> dict[str, Any]:
    """Write a safetensors file (aliases in its metadata), fsync it, return its manifest entry."""
    meta = {"format": "pt", _ALIASES_KEY: json.dumps(aliases), **metadata}
    save_file(tensors, str(path), metadata=meta)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _hash_file(path)


def _read_tensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> (every name including aliases -> tensor, metadata).

    Aliased names share one tensor object. A truncated or corrupt file raises ValueError naming it.
    """
    if not path.is_file():
        raise _damaged(path, "file is missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of corruption
        raise _damaged(path, f"cannot be read as safetensors ({type(e).__name__}: {e})") from None
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise _damaged(path, f"metadata {_ALIASES_KEY} is not valid JSON ({e})") from None
    for alias, target in aliases.items():
        if target not in out:
            raise _damaged(path, f"alias {alias!r} points to {target!r}, which is not in the file")
        out[alias] = out[target]
    return out, metadata


def _check_manifest(folder: Path, manifest: Mapping[str, Any], names: list[str] | None = None, *, verify: bool) -> None:
    """Compare files of ``folder`` with their recorded size (always) and sha256 (``verify``)."""
    for name in manifest if names is None else names:
        if name not in manifest:
            continue
        path = folder / name
        if not path.is_file():
            raise _damaged(path, "file is missing")
        expected = manifest[name]
        size = path.stat().st_size
        if size != expected["bytes"]:
            kind = "truncated" if size < expected["bytes"] else "larger than written"
            raise _damaged(path, f"file is {size} bytes, {expected['bytes']} were written ({kind})")
        if verify and _hash_file(path)["sha256"] != expected["sha256"]:
            raise _damaged(path, "sha256 differs from the one recorded when it was written (corrupted)")


def _device(map_location: str | torch.device) -> str:
    return str(torch.device(map_location))


# --------------------------------------------------------------------------- RNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def capture_rng() -> dict[str, Any]:
    """States of every global RNG as a compact JSON-able dict (bytes as base64).

    Returns:
        {"python": {"version", "state" (625 uint32, base64), "gauss"},
         "numpy": {"kind", "keys" (624 uint32, base64), "pos", "has_gauss", "gauss"},
         "torch": base64 of torch.get_rng_state() (uint8),
         "cuda": [base64 of the current CUDA device's state] if CUDA is initialised, else []}

    Only the current device is captured: a training process drives one device, and
    touching the others would create a CUDA context (and use memory) on each of them.
    """
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda: list[str] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [_b64(torch.cuda.get_rng_state().numpy().tobytes())]
    return {
        "python": {"version": version, "state": _b64(np.asarray(state, dtype="<u4").tobytes()), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": _b64(np.asarray(keys, dtype="<u4").tobytes()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached),
        },
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": cuda,
    }


def restore_rng(d: Mapping[str, Any]) -> None:
    """Set every global RNG from a dict made by ``capture_rng``.

    The CUDA state goes to the current CUDA device (see ``capture_rng``); a warning is
    logged when a CUDA state was saved but CUDA is unavailable.
    """
    py = d["python"]
    state = tuple(int(x) for x in np.frombuffer(_unb64(py["state"]), dtype="<u4"))
    random.setstate((py["version"], state, py["gauss"]))
    npd = d["numpy"]
    keys = np.frombuffer(_unb64(npd["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((npd["kind"], keys, npd["pos"], npd["has_gauss"], npd["gauss"]))
    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(d["torch"])), dtype=torch.uint8))
    cuda = d.get("cuda") or []
    if not cuda:
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint holds a CUDA RNG state but CUDA is unavailable; not restored")
        return
    torch.cuda.set_rng_state(torch.frombuffer(bytearray(_unb64(cuda[0])), dtype=torch.uint8))


# --------------------------------------------------------------------------- save


def save_checkpoint(
    save_dir: str | os.PathLike,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    files: Mapping[str, bytes] | None = None,
    keep_last: int = 5,
    is_best: bool = False,
) -> Path:
    """Write ``save_dir/checkpoint_{step:08d}/`` atomically, point latest.json at it, prune.

    Args:
        save_dir: checkpoint folder (created if missing).
        step: number of optimizer updates done (int >= 0).
        model_state: ``model.state_dict()``, name -> Tensor of any shape/dtype/device;
            tied (aliased) tensors are stored once.
        optimizer: its ``state_dict()`` is stored (tensors in optimizer.safetensors,
            structure and param_groups in state.json); None stores no optimizer.
        state: trainer state, JSON values and tuples (epoch, update in epoch, scheduler
            state dict, best validation, ...). If it has no "rng" key, ``capture_rng()``
            is stored under "rng".
        config: JSON dict written to config.json (model config, train config, ...);
            also embedded in model.safetensors' metadata so the weights file stands alone.
        files: extra files, plain name -> bytes (e.g. {"spm.model": ...}).
        keep_last: checkpoints kept (newest by step) besides the best and the latest;
            0 keeps all.
        is_best: also point best.json at this checkpoint.

    Returns:
        Path of the checkpoint folder. Re-saving an existing step replaces it safely.
    """
    save_dir = Path(save_dir)
    name = checkpoint_name(step)
    files = dict(files or {})
    for fname, data in files.items():
        if fname in _RESERVED or not fname or fname.startswith(".") or "/" in fname or "\\" in fname:
            raise ValueError(
                f"extra file name {fname!r} is not allowed: use a plain, non-hidden name other than {sorted(_RESERVED)}"
            )
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra file {fname!r} must be bytes, got {type(data).__name__}")
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")

    # Encode everything first: a state that is not JSON-able fails before any file is touched.
    state = dict(state)
    state.setdefault("rng", capture_rng())
    state_json = _encode(state, "state")
    try:
        config_bytes = _json_bytes(dict(config))
    except (TypeError, ValueError) as e:
        raise TypeError(f"config is not JSON-serialisable: {e}") from None
    model_tensors, model_aliases = _dedupe(model_state, "model_state")
    opt_meta = None
    if optimizer is not None:
        opt_sd = optimizer.state_dict()
        raw: dict[str, torch.Tensor] = {}
        opt_meta = {
            "class": type(optimizer).__name__,
            "state": _encode(opt_sd["state"], "state", raw),
            "param_groups": _encode(opt_sd["param_groups"], "param_groups", raw),
        }
        opt_tensors, opt_aliases = _dedupe(raw, "optimizer state")

    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / name
    tmp = save_dir / f"{_TMP}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model_meta = {_CONFIG_KEY: config_bytes.decode("utf-8"), "janus.step": str(step)}
        manifest = {MODEL_FILE: _write_tensors(tmp / MODEL_FILE, model_tensors, model_aliases, model_meta)}
        if optimizer is not None:
            opt_file_meta = {"janus.step": str(step)}
            manifest[OPTIMIZER_FILE] = _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors, opt_aliases, opt_file_meta)
        manifest[CONFIG_FILE] = _write_bytes(tmp / CONFIG_FILE, config_bytes)
        for fname, data in files.items():
            manifest[fname] = _write_bytes(tmp / fname, bytes(data))
        doc = {"format": FORMAT_VERSION, "step": step, "files": manifest, "optimizer": opt_meta, "state": state_json}
        _write_bytes(tmp / STATE_FILE, _json_bytes(doc))  # last, though the folder rename is what commits
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    pointer = {"checkpoint": name, "step": step}
    _atomic_write_json(save_dir / LATEST_FILE, pointer)
    if is_best:
        _atomic_write_json(save_dir / BEST_FILE, pointer)
    prune_checkpoints(save_dir, keep_last)
    return final


def _read_pointer(path: Path) -> str | None:
    """Checkpoint name in latest.json / best.json, or None if the file is missing or unusable."""
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    if not isinstance(name, str) or not _NAME_RE.match(name):
        log.warning("ignoring %s: %r is not a checkpoint name", path, name)
        return None
    return name


def _remove_dir(path: Path) -> None:
    # Renamed first so that a crash mid-delete leaves a .tmp-* folder, never a partial checkpoint.
    doomed = path.parent / f"{_TMP}delete-{path.name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(save_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete checkpoints beyond the newest ``keep_last`` (0 = keep all), sparing best and latest.

    Also removes leftovers of dead writers (``.tmp-*``, ``.old-*`` whose pid is not alive
    or is this process's); an ``.old-checkpoint_*`` whose checkpoint is missing is renamed
    back instead. Failures are logged, not raised: the checkpoint that was just saved stands.

    Returns:
        The checkpoint folders deleted.
    """
    save_dir = Path(save_dir)
    for entry in sorted(save_dir.iterdir()):
        if not (entry.name.startswith(_TMP) or entry.name.startswith(_OLD)) or not _is_stale(entry.name):
            continue
        try:
            m = _OLD_RE.match(entry.name)
            original = save_dir / checkpoint_name(int(m.group(1))) if m else None
            if original is not None and entry.is_dir() and not original.exists() and _is_complete(entry):
                log.warning("restoring %s left aside by an interrupted save", entry)
                os.rename(entry, original)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as e:
            log.warning("could not clean up %s: %s", entry, e)

    deleted: list[Path] = []
    if keep_last == 0:
        return deleted
    ckpts = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name)))
    keep = {p.name for _, p in ckpts[-keep_last:]}
    keep |= {n for n in (_read_pointer(save_dir / LATEST_FILE), _read_pointer(save_dir / BEST_FILE)) if n}
    for _, p in ckpts:
        if p.name in keep:
            continue
        try:
            _remove_dir(p)
            deleted.append(p)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", p, e)
    return deleted


# --------------------------------------------------------------------------- find


def _is_complete(folder: Path) -> bool:
    """All required files present and state.json parses (contents are checked by load_checkpoint)."""
    try:
        doc = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        manifest = doc["files"]
        required = (MODEL_FILE, CONFIG_FILE, *manifest)
        return isinstance(doc["step"], int) and all((folder / n).is_file() for n in required)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return False


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint_*`` folders of ``save_dir``, oldest step first (``.tmp-*`` ignored)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if (m := _NAME_RE.match(p.name)) and p.is_dir())
    return [p for _, p in found if _is_complete(p)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, or None if ``save_dir`` holds none.

    The folder named by latest.json if it exists; otherwise the highest-step complete
    ``checkpoint_*`` folder (an ``.old-checkpoint_*`` left by a save interrupted while
    replacing that very step also counts). ``.tmp-*`` folders are never returned.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    name = _read_pointer(save_dir / LATEST_FILE)
    if name is not None and (save_dir / name).is_dir():
        return save_dir / name
    candidates = [(int(_NAME_RE.match(p.name).group(1)), 1, p) for p in list_checkpoints(save_dir)]
    for p in save_dir.iterdir():
        m = _OLD_RE.match(p.name)
        if m and p.is_dir() and not (save_dir / checkpoint_name(int(m.group(1)))).exists() and _is_complete(p):
            candidates.append((int(m.group(1)), 0, p))
    if not candidates:
        return None
    best = max(candidates)[2]
    if name is not None:
        log.warning("%s names %s, which is missing; resuming from %s", save_dir / LATEST_FILE, name, best)
    return best


def last_checkpoints(save_dir: str | os.PathLike, n: int) -> list[Path]:
    """The ``n`` newest complete checkpoints of ``save_dir``, oldest first (for averaging)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    found = list_checkpoints(save_dir)
    if len(found) < n:
        raise ValueError(f"asked for the last {n} checkpoints but {save_dir} holds only {len(found)} complete ones")
    return found[-n:]


# --------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """A training checkpoint as loaded by ``load_checkpoint``.

    Attributes:
        path: the checkpoint folder.
        step: optimizer updates done when it was written.
        model_state: name -> Tensor, ready for ``model.load_state_dict`` (tied names share one tensor).
        optimizer_tensors: tensors of the optimizer state dict, e.g. "state.{param_index}.exp_avg"
            -> Tensor; empty when saved without an optimizer.
        optimizer_meta: {"class", "state", "param_groups"} JSON with tensor references, or None.
        state: the trainer state passed to ``save_checkpoint`` (with "rng").
        config: the config dict passed to ``save_checkpoint``.
        files: names of the extra files in ``path`` (e.g. ["spm.model"]).
    """

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any] | None
    state: dict[str, Any]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The ``optimizer.state_dict()`` that was saved: {"state": {int: {...}}, "param_groups": [...]}."""
        if self.optimizer_meta is None:
            raise ValueError(f"{self.path / STATE_FILE}: this checkpoint was saved without an optimizer")
        try:
            return {
                "state": _decode(self.optimizer_meta["state"], self.optimizer_tensors),
                "param_groups": _decode(self.optimizer_meta["param_groups"], self.optimizer_tensors),
            }
        except KeyError as e:
            raise _damaged(self.path / OPTIMIZER_FILE, f"does not match {STATE_FILE} ({e})") from None


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    """Load a checkpoint folder written by ``save_checkpoint``.

    Args:
        path: the ``checkpoint_*`` folder (e.g. from ``latest_checkpoint``).
        map_location: device the tensors are loaded to ("cpu", "cuda:0", ...).
        verify: compare every file's sha256 with the one recorded at save time
            (sizes are always compared).

    Raises:
        ValueError naming the file when a file is missing, truncated, corrupt or of an
        unknown format, with the folder to delete to fall back to the previous checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    state_path = path / STATE_FILE
    if not state_path.is_file() and (path / AVERAGE_FILE).is_file():
        raise ValueError(f"{path} holds averaged weights, not a training checkpoint; load it with load_model_state")
    doc = _read_json(state_path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION or not isinstance(doc.get("step"), int):
        version = doc.get("format") if isinstance(doc, dict) else None
        raise _damaged(state_path, f"not a janus checkpoint state of format {FORMAT_VERSION} (format={version!r})")
    manifest = doc.get("files", {})
    _check_manifest(path, manifest, verify=False)
    if verify:
        _check_manifest(path, manifest, verify=True)
    device = _device(map_location)
    model_state, _ = _read_tensors(path / MODEL_FILE, device)
    opt_meta = doc.get("optimizer")
    opt_tensors = _read_tensors(path / OPTIMIZER_FILE, device)[0] if opt_meta is not None else {}
    config = _read_json(path / CONFIG_FILE)
    ckpt = Checkpoint(
        path=path,
        step=doc["step"],
        model_state=model_state,
        optimizer_tensors=opt_tensors,
        optimizer_meta=opt_meta,
        state=_decode(doc["state"]),
        config=config,
        files=[n for n in manifest if n not in _RESERVED],
    )
    return ckpt


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the optimizer state of ``ckpt`` into ``optimizer`` (same parameters, same groups).

    Tensors are moved by ``optimizer.load_state_dict`` to each parameter's device and dtype.
    """
    meta = ckpt.optimizer_meta
    if meta is not None and meta.get("class") != type(optimizer).__name__:
        raise ValueError(
            f"{ckpt.path} holds {meta.get('class')} state, cannot restore it into {type(optimizer).__name__}"
        )
    try:
        optimizer.load_state_dict(ckpt.optimizer_state_dict())
    except ValueError as e:
        if str(ckpt.path) in str(e):
            raise
        raise ValueError(f"cannot restore the optimizer from {ckpt.path}: {e}") from None


def load_model_state(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and config for inference.

    Args:
        path: a checkpoint folder, an averaged folder (``average_checkpoints``), or a
            ``.safetensors`` file written by either.
        map_location: device of the returned tensors.

    Returns:
        (state_dict name -> Tensor, config dict). A lone ``.safetensors`` file carries its
        config in its metadata; a ``config.json`` beside it is used otherwise.
    """
    path = Path(path)
    if path.is_dir():
        folder, file = path, path / MODEL_FILE
        for manifest_name in (STATE_FILE, AVERAGE_FILE):
            if (folder / manifest_name).is_file():
                doc = _read_json(folder / manifest_name)
                manifest = doc.get("files", {}) if isinstance(doc, dict) else {}
                _check_manifest(folder, manifest, [MODEL_FILE], verify=True)
                break
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .safetensors file")
    tensors, metadata = _read_tensors(file, _device(map_location))
    if _CONFIG_KEY in metadata:
        try:
            return tensors, json.loads(metadata[_CONFIG_KEY])
        except json.JSONDecodeError as e:
            raise _damaged(file, f"metadata {_CONFIG_KEY} is not valid JSON ({e})") from None
    if (folder / CONFIG_FILE).is_file():
        return tensors, _read_json(folder / CONFIG_FILE)
    raise ValueError(f"{file} has no config in its metadata and there is no {folder / CONFIG_FILE}")


# --------------------------------------------------------------------------- average


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model file or folder that ``path`` names: a checkpoint folder, an averaged folder or a
    .safetensors file as it is, a training folder as its latest checkpoint, ``builtin:NAME`` as the
    folder of that model shipped in ``janus.samples`` (e.g. ``builtin:de-en``).

    Raises FileNotFoundError naming ``path`` (the message the ``janus`` commands print) when it is none.
    """
    from janus.samples import builtin_model, is_builtin

    if is_builtin(path):
        return builtin_model(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .safetensors file (it does not exist)")
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no {MODEL_FILE} and no checkpoint_* folder")
        log.info("%s is a training folder; using its latest checkpoint %s", path, latest.name)
        return latest
    return path


def average_checkpoints(
    paths: list[str | os.PathLike], output: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write the mean of the model weights of ``paths`` to the folder ``output``, atomically.

    Floating tensors are summed in float64 and cast back to their dtype; integer and bool
    tensors (counters, masks) must be equal in every checkpoint. ``output`` gets
    model.safetensors (config in its metadata), config.json and the extra files (e.g.
    spm.model) of the last path, and average.json listing the averaged checkpoints.

    Args:
        paths: checkpoint folders or .safetensors files, all with the same names, shapes, dtypes.
        output: folder to write (replaced if it exists).
        dtype: the floating tensors are written in this dtype (e.g. torch.float16 to ship a model at half
            the size; loading casts them to the model's dtype); None keeps theirs.

    Returns:
        ``output`` as a Path.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    paths = [Path(p) for p in paths]
    files = [p / MODEL_FILE if p.is_dir() else p for p in paths]
    first, _ = load_model_state(paths[0])
    first_aliases = _aliases_of(files[0])
    sums: dict[str, torch.Tensor] = {}
    exact: dict[str, torch.Tensor] = {}
    for name, t in first.items():
        if name in first_aliases:
            continue
        if t.is_floating_point():
            sums[name] = t.to(torch.float64)
        else:
            exact[name] = t
    ref_shapes = {k: (tuple(v.shape), v.dtype) for k, v in first.items()}
    config: dict[str, Any] = {}
    for p, f in zip(paths[1:], files[1:], strict=True):
        sd, config = load_model_state(p)
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        if shapes.keys() != ref_shapes.keys():
            missing, extra = sorted(ref_shapes.keys() - shapes.keys()), sorted(shapes.keys() - ref_shapes.keys())
            raise ValueError(
                f"cannot average {f} with {files[0]}: names differ; missing from it: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, extra in it: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )
        for k, (shape, kind) in shapes.items():
            if (shape, kind) != ref_shapes[k]:
                raise ValueError(
                    f"cannot average {f} with {files[0]}: {k!r} is {shape} {kind} there, {ref_shapes[k]} in the first"
                )
        if _aliases_of(f) != first_aliases:
            raise ValueError(f"cannot average {f} with {files[0]}: they tie different weights")
        for k in sums:
            sums[k] += sd[k].to(torch.float64)
        for k, t in exact.items():
            if not torch.equal(t, sd[k]):
                raise ValueError(f"cannot average {f} with {files[0]}: non-floating tensor {k!r} ({t.dtype}) differs")
    if len(paths) == 1:
        config = load_model_state(paths[0])[1]
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}: averaged weights are written in a floating dtype")
    averaged = {k: (s / len(paths)).to(dtype or first[k].dtype) for k, s in sums.items()}
    averaged.update(exact)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f"{_TMP}{output.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        config_bytes = _json_bytes(config)
        listed = [str(p) for p in paths]
        manifest = {
            MODEL_FILE: _write_tensors(
                tmp / MODEL_FILE,
                {k: averaged[k] for k in first if k not in first_aliases},
                first_aliases,
                {_CONFIG_KEY: config_bytes.decode("utf-8"), "janus.averaged": json.dumps(listed)},
            ),
            CONFIG_FILE: _write_bytes(tmp / CONFIG_FILE, config_bytes),
        }
        last = paths[-1]
        if last.is_dir():
            for extra in sorted(last.iterdir()):
                if extra.is_file() and extra.name not in _RESERVED and not extra.name.startswith("."):
                    manifest[extra.name] = _write_bytes(tmp / extra.name, extra.read_bytes())
        _write_bytes(tmp / AVERAGE_FILE, _json_bytes({"format": FORMAT_VERSION, "averaged": listed, "files": manifest}))
        _fsync_dir(tmp)
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _aliases_of(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except Exception as e:
        raise _damaged(file, f"cannot be read as safetensors ({type(e).__name__}: {e})") from None
