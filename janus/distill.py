"""Sequence-level knowledge distillation (``janus distill``): a prepared folder whose targets are a
model's own AR beam-search outputs.

A non-autoregressive model learns much better from a teacher's beam outputs than from the
references (Kim & Rush 2016; Gu et al. 2018): the outputs are less diverse, so the NAR stream has
fewer modes to choose between. ``distill`` translates the train (and valid) sources of a folder
written by ``janus prepare`` with a checkpoint's beam search and writes a new folder in the very
same format, so ``janus train --data DEST`` trains on the outputs as usual::

    spm.model, spm.vocab        copied: the same vocabulary (the checkpoint's must be this one)
    {split}.{src}.bin / .idx    copied: the same source ids, for every split
    {split}.lines               copied
    {split}.{tgt}.bin / .idx    train and valid: the model's outputs; test (and valid with
                                ``keep_valid``): copied, so evaluation uses the real references
    manifest.json               the source's manifest with the new target counts and a "distill"
                                record (source, checkpoint, decoding options, counts); written last

Work is done in chunks of ``chunk_size`` consecutive sentences (each sorted by length into
batches inside ``Generator.generate_iter``). Every decoded chunk is written atomically to
``DEST/.distill/`` before the next one starts, so a killed run loses at most one chunk: the same
call continues after the last complete chunk ("resuming: N of M sentences already distilled").
The shards and, last, the manifest are written when every chunk is done, then ``.distill/`` is
removed. A folder with a manifest is therefore a finished one, and a finished folder is not
redone. A rerun with other settings (checkpoint, data, decoding options, chunk size) is refused
rather than mixing the outputs of two settings.

What happens to unusual outputs (counted per split, printed and stored in the manifest; no pair is
ever dropped, so DEST has exactly the pairs of the source folder):

- empty (the search ended at once; only possible with ``min_len=0``): the real target is kept;
- truncated (non-empty, and as long as ``max_len_a * source_length + max_len_b`` allows, so the
  search stopped at the length limit rather than by choosing eos): kept as the model wrote it with
  ``truncated="keep"`` (the default), replaced by the real target with ``truncated="reference"``;
- source truncated (a source longer than the model's learned positions, decoded cut): the real
  target is kept, since the output translates only part of the source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from janus import __version__
from janus.api import Generator
from janus.checkpoint import MODEL_FILE, resolve_model_path
from janus.config import DecodeConfig
from janus.data import MANIFEST, SPLITS, Dataset, _fsync_dir, atomic_write, load_manifest
from janus.decoding.common import length_limits
from janus.vocab import Vocab

PathLike = Union[str, os.PathLike]

WORK_DIR = ".distill"
STATE_FILE = "state.json"
TRUNCATED_POLICIES = ("keep", "reference")
DEFAULT_CHUNK_SIZE = 2000
# Decoded splits; test is always copied, since evaluation uses the real references.
_DECODED = ("train", "valid")


def distill(
    data: PathLike,
    checkpoint: PathLike,
    destdir: PathLike,
    options: Optional[DecodeConfig] = None,
    *,
    keep_valid: bool = False,
    truncated: str = "keep",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: Union[str, torch.device] = "auto",
    dtype: Union[str, torch.dtype] = "auto",
    progress: bool = False,
    verbose: bool = True,
) -> dict:
    """Write a prepared folder whose train (and valid) targets are ``checkpoint``'s beam outputs.

    See the module docstring for the layout, the chunked resume and the handling of empty and
    truncated outputs. Steps: (1) check the arguments, the folder and that the checkpoint's
    vocabulary is the folder's; (2) decode every chunk not yet on disk; (3) write the shards, then
    the manifest; (4) print the counts per split.

    Args:
        data: a folder written by ``janus prepare`` (it must have a train split).
        checkpoint: a checkpoint folder, averaged folder, training folder (its latest
            checkpoint) or .safetensors file, with the same sentencepiece model as ``data``.
        destdir: the new folder; it must not exist, be empty, or hold an unfinished (or
            finished) ``distill`` of the same settings. Never ``data`` itself.
        options: the AR decoding options (``mode`` must be "ar"); default
            ``DecodeConfig(mode="ar")``, beam 5. ``window`` is ignored: each chunk is one window.
        keep_valid: copy the real valid targets instead of distilling valid.
        truncated: "keep" the truncated outputs (counted) or replace them by the "reference".
        chunk_size: sentences per chunk (the unit of resumption, and of length sorting).
        device, dtype: where the model runs (see ``janus.Generator``).
        progress: show a tqdm bar per decoded split on stderr.
        verbose: print what it does and the counts.
    Returns:
        The new folder's manifest (also written to ``destdir/manifest.json``); its "distill"
        entry holds the settings and, per split, the counts.
    Raises:
        FileNotFoundError: ``data`` or its manifest, or ``checkpoint``, does not exist.
        ValueError: a bad option, no train split, ``destdir`` equal to ``data`` or holding
            something else, a vocabulary mismatch, or a damaged chunk file.
    """
    say = print if verbose else _quiet
    # 1. Everything that can be wrong is found before the destination is touched.
    options = _check_options(options, truncated, chunk_size)
    data, dest = Path(data), Path(destdir)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} does not exist; give a folder written by janus prepare")
    manifest = load_manifest(data)
    if "train" not in manifest["splits"]:
        raise ValueError(f"{data} has no train split (found {sorted(manifest['splits'])}); distill needs one")
    if dest.resolve() == data.resolve():
        raise ValueError(f"--destdir {dest} is the --data folder itself; give a new folder for the distilled data")
    decoded = [s for s in _DECODED if s in manifest["splits"] and not (s == "valid" and keep_valid)]
    sets = {s: Dataset(data, s) for s in manifest["splits"]}  # checks every shard of every split

    model_path = resolve_model_path(checkpoint)  # a training folder: its latest checkpoint, now
    gen = Generator.from_checkpoint(model_path, device=device, dtype=dtype)
    _check_vocab(gen, checkpoint, data / manifest["vocab"])
    settings = {
        "source_manifest_sha256": _sha256(data / MANIFEST),
        "checkpoint_sha256": _sha256(model_path / MODEL_FILE if model_path.is_dir() else model_path),
        "decode": dataclasses.asdict(options),
        "dtype": str(gen.dtype).removeprefix("torch."),
        "chunk_size": chunk_size,
        "targets": {s: "distilled" if s in decoded else "reference" for s in manifest["splits"]},
        "truncated": truncated,
    }
    record = {
        "source": str(data.resolve()),
        "checkpoint": str(model_path.resolve()),
        "device": str(gen.device),
        "janus_version": __version__,
        "settings": settings,
    }

    finished = _existing(dest, settings)
    if finished is not None:
        say(f"janus distill: {dest} is already distilled with these settings; nothing to do")
        return finished
    work = dest / WORK_DIR
    resumed = (work / STATE_FILE).is_file()
    work.mkdir(parents=True, exist_ok=True)
    if not resumed:
        atomic_write(work / STATE_FILE, json.dumps(settings, indent=2) + "\n")
    for leftover in work.glob(".*.tmp"):  # a chunk being written when the last run was killed
        leftover.unlink(missing_ok=True)

    # 2. Decode the chunks that are not on disk yet.
    plan = {s: _chunks(len(sets[s]), chunk_size) for s in decoded}
    total = sum(len(sets[s]) for s in decoded)
    done = sum(b - a for s in decoded for k, (a, b) in enumerate(plan[s]) if _chunk_path(work, s, k).is_file())
    say(
        f"janus distill: {data} -> {dest}: {', '.join(decoded)} ({total:,} sentences) with AR beam "
        f"{options.beam_size} of {model_path}, in chunks of {chunk_size:,}"
    )
    if resumed:
        say(f"resuming: {done:,} of {total:,} sentences already distilled ({work})")
    for split in decoded:
        _decode_split(gen, sets[split], options, plan[split], work, progress)

    # 3. Shards, then the manifest (last), then the chunks are no longer needed.
    counts = {s: _assemble_split(sets[s], work, plan[s], truncated, dest) for s in decoded}
    for split in manifest["splits"]:
        if split not in decoded:
            _copy_split(data, dest, split, manifest, targets=True)
    out = _manifest(manifest, counts, record, keep_valid)
    _copy(data / manifest["vocab"], dest / manifest["vocab"])
    if (data / "spm.vocab").is_file():
        _copy(data / "spm.vocab", dest / "spm.vocab")
    _fsync_dir(dest)
    atomic_write(dest / MANIFEST, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    _fsync_dir(dest)
    shutil.rmtree(work, ignore_errors=True)

    # 4. Say what came out.
    for split, c in counts.items():
        say(_summary(split, c, truncated))
    for split, how in settings["targets"].items():
        if how == "reference":
            say(f"{split}: real targets copied")
    say(f"distilled {dest}")
    return out


# ====================================================================== checks


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _check_options(options: Optional[DecodeConfig], truncated: str, chunk_size: int) -> DecodeConfig:
    """The decoding options distill uses (AR, one window per chunk), or a ValueError."""
    options = options if options is not None else DecodeConfig(mode="ar")
    if options.mode != "ar":
        raise ValueError(f"distill decodes with AR beam search; got mode={options.mode!r}: use mode='ar'")
    if truncated not in TRUNCATED_POLICIES:
        raise ValueError(f"truncated={truncated!r}: choose {' or '.join(TRUNCATED_POLICIES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (sentences per resumable chunk)")
    return dataclasses.replace(options, window=0)


def _check_vocab(gen: Generator, checkpoint: PathLike, data_vocab: Path) -> None:
    """The checkpoint's sentencepiece model must be the folder's (else the ids mean other pieces)."""
    if gen.vocab is None or gen.vocab.path is None:
        raise ValueError(
            f"{checkpoint} has no vocabulary (spm.model) beside its weights; distill needs it to check that the "
            f"model reads the ids of {data_vocab}"
        )
    if gen.vocab.path.read_bytes() == data_vocab.read_bytes():
        return
    # Same model, other serialization (a checkpoint stores the serialized proto): still the same.
    if gen.vocab.to_bytes() == Vocab(data_vocab).to_bytes():
        return
    raise ValueError(
        f"vocabulary mismatch: the checkpoint's {gen.vocab.path} ({len(gen.vocab):,} pieces) is not the data's "
        f"{data_vocab} ({len(Vocab(data_vocab)):,} pieces); distill a folder prepared with the vocabulary the model "
        f"was trained on (the --data of its janus train)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Human-readable differences of two JSON values ("decode.beam_size: 5 -> 4")."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _existing(dest: Path, settings: dict) -> Optional[dict]:
    """The manifest when ``dest`` is a finished distill of ``settings``; None when work remains
    (a new, empty or unfinished folder of the same settings); a ValueError otherwise."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise ValueError(f"--destdir {dest} is a file; give a new folder")
    state = dest / WORK_DIR / STATE_FILE
    if (dest / MANIFEST).is_file():
        manifest = load_manifest(dest)
        if "distill" not in manifest:
            raise ValueError(f"--destdir {dest} holds a prepared folder that janus distill did not write; give a new "
                             "folder")  # fmt: skip
        old = manifest["distill"]["settings"]
        what = "was distilled"
    elif state.is_file():
        old = json.loads(state.read_text(encoding="utf-8"))
        manifest, what = None, "holds an unfinished distillation"
    elif any(dest.iterdir()):
        raise ValueError(f"--destdir {dest} exists and is not a janus distill output; give a new or empty folder")
    else:
        return None
    diff = _differences(old, settings)
    if diff:
        raise ValueError(
            f"--destdir {dest} {what} with other settings ({'; '.join(diff)}); rerun with the same settings, "
            f"or give a new folder (or remove {dest} to start over)"
        )
    if manifest is not None:
        shutil.rmtree(dest / WORK_DIR, ignore_errors=True)  # killed after the manifest, before the cleanup
    return manifest


# ====================================================================== chunks


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[first, last) of each chunk of a split of ``n`` sentences."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _chunk_path(work: Path, split: str, k: int) -> Path:
    return work / f"{split}.{k:06d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one decoded chunk atomically (an .npz of plain arrays; read without pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _load_chunk(path: Path, n: int) -> dict[str, np.ndarray]:
    """The arrays of a chunk of ``n`` sentences, checked."""
    try:
        with np.load(path, allow_pickle=False) as z:
            c = {k: z[k] for k in ("ids", "lengths", "truncated", "source_cut", "seconds")}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"chunk {path} is damaged ({e}); delete it and rerun to decode it again") from None
    if not (len(c["lengths"]) == len(c["truncated"]) == len(c["source_cut"]) == n) or (
        int(c["lengths"].sum()) != len(c["ids"])
    ):
        raise ValueError(f"chunk {path} does not hold {n} sentences; delete it and rerun to decode it again")
    return c


def _decode_split(
    gen: Generator, ds: Dataset, options: DecodeConfig, plan: list[tuple[int, int]], work: Path, progress: bool
) -> None:
    """Decode the chunks of ``ds`` that are not in ``work`` yet, each written before the next starts."""
    todo = [k for k in range(len(plan)) if not _chunk_path(work, ds.split, k).is_file()]
    done = len(ds) - sum(plan[k][1] - plan[k][0] for k in todo)
    cfg = gen.model.cfg
    with tqdm(total=len(ds), initial=done, disable=not progress, unit="sent", desc=f"distill {ds.split}",
              file=sys.stderr) as bar:  # fmt: skip
        for k in todo:
            first, last = plan[k]
            start = time.perf_counter()
            ids = [ds.src(i).tolist() for i in range(first, last)]
            cut = _truncate_sources(gen, ids, options)
            # The same limits the search applies: an output of max_lens tokens had eos forced there.
            _, max_lens = length_limits(
                torch.tensor([len(s) for s in ids], dtype=torch.long),
                max_len_a=options.max_len_a,
                max_len_b=options.max_len_b,
                min_len=options.min_len,
                max_target_positions=cfg.max_target_positions,
            )
            outputs = []
            for h in gen.generate_iter(ids, options):
                outputs.append(h.ids)
                bar.update(1)
            lengths = np.array([len(o) for o in outputs], dtype=np.int64)
            source_cut = np.zeros(len(ids), dtype=bool)
            source_cut[cut] = True
            _save_chunk(
                _chunk_path(work, ds.split, k),
                {
                    "ids": np.fromiter((t for o in outputs for t in o), dtype=np.int32, count=int(lengths.sum())),
                    "lengths": lengths,
                    "truncated": (lengths > 0) & (lengths >= max_lens.numpy()),
                    "source_cut": source_cut,
                    "seconds": np.float64(time.perf_counter() - start),
                },
            )


def _truncate_sources(gen: Generator, ids: list[list[int]], options: DecodeConfig) -> list[int]:
    """Cut the sources longer than the model allows (in place, as decoding would); their indices."""
    cut: list[int] = []
    gen.truncate(ids, options, lambda i, n, limit: cut.append(i))
    return cut


# ====================================================================== the new folder


def _copy(src: Path, dst: Path) -> None:
    """Copy a file so that readers see the whole copy or nothing (temporary file, fsync, rename)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_split(data: Path, dest: Path, split: str, manifest: dict, *, targets: bool) -> None:
    """Copy the source shards and line numbers of ``split`` (and its target shards with ``targets``)."""
    langs = [manifest["src"], manifest["tgt"]] if targets else [manifest["src"]]
    for name in [f"{split}.{lang}.{ext}" for lang in langs for ext in ("bin", "idx")] + [f"{split}.lines"]:
        _copy(data / name, dest / name)


def _assemble_split(ds: Dataset, work: Path, plan: list[tuple[int, int]], truncated: str, dest: Path) -> dict:
    """Write the distilled target shards of ``ds`` from its chunks (real targets where the policy
    says), copy its source shards, and return its counts."""
    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    c = {"sentences": len(ds), "empty": 0, "truncated": 0, "source_truncated": 0, "reference_kept": 0}
    seconds = 0.0
    for k, (first, last) in enumerate(plan):
        chunk = _load_chunk(_chunk_path(work, ds.split, k), last - first)
        seconds += float(chunk["seconds"])
        n = chunk["lengths"]
        empty, trunc, cut = n == 0, chunk["truncated"] & ~chunk["source_cut"], chunk["source_cut"]
        trunc &= ~empty
        use_ref = empty | cut | (trunc if truncated == "reference" else np.zeros_like(trunc))
        c["empty"] += int((empty & ~cut).sum())
        c["truncated"] += int(trunc.sum())
        c["source_truncated"] += int(cut.sum())
        c["reference_kept"] += int(use_ref.sum())
        offsets = np.concatenate([[0], np.cumsum(n)])
        for j in range(last - first):
            if use_ref[j]:
                piece = np.asarray(ds.tgt(first + j), dtype=np.int32)
            else:
                piece = chunk["ids"][offsets[j] : offsets[j + 1]]
            pieces.append(piece)
            lengths.append(np.int64(len(piece)))
    n = np.array(lengths, dtype=np.int64)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32)
    tgt = ds.tgt_lang
    atomic_write(dest / f"{ds.split}.{tgt}.bin", flat)
    atomic_write(dest / f"{ds.split}.{tgt}.idx", offsets)
    _copy_split(ds.destdir, dest, ds.split, ds.manifest, targets=False)
    c.update(
        tgt_tokens=int(offsets[-1]),
        tgt_max_len=int(n.max()) if len(n) else 0,
        reference_tgt_tokens=int(ds.info["tgt_tokens"]),
        seconds=round(seconds, 3),
    )
    return c


def _manifest(source: dict, counts: dict[str, dict], record: dict, keep_valid: bool) -> dict:
    """The new folder's manifest: the source's, with the distilled splits' target counts and the record."""
    out = json.loads(json.dumps(source))  # a deep copy
    for split, c in counts.items():
        info = out["splits"][split]
        info["tgt_tokens"], info["tgt_max_len"] = c["tgt_tokens"], c["tgt_max_len"]
        # The raw target file no longer describes these targets.
        info["files"] = {"src": info["files"]["src"], "tgt": None}
        info["sha256"] = {"src": info["sha256"]["src"], "tgt": None}
        info["targets"] = "distilled"
    for split in out["splits"]:
        out["splits"][split].setdefault("targets", "reference")
    rec = dict(record)
    rec["splits"] = {
        s: counts.get(s, {"targets": "reference (--keep-valid)" if s == "valid" and keep_valid else "reference"})
        for s in SPLITS
        if s in out["splits"]
    }
    rec["policy"] = {
        "empty": "the real target is kept",
        "truncated": "kept as decoded" if record["settings"]["truncated"] == "keep" else "the real target is kept",
        "source_truncated": "the real target is kept",
    }
    if "distill" in source:  # distilling distilled data: keep the chain
        rec["source_distill"] = source["distill"]
    out["distill"] = rec
    return out


def _summary(split: str, c: dict, truncated: str) -> str:
    rate = c["sentences"] / c["seconds"] if c["seconds"] > 0 else float("inf")
    return (
        f"{split}: {c['sentences']:,} sentences distilled ({c['seconds']:.1f} s of decoding, {rate:.1f} sent/s); "
        f"empty {c['empty']}, truncated {c['truncated']} ({'kept' if truncated == 'keep' else 'real target kept'}), "
        f"source truncated {c['source_truncated']}; real targets kept for {c['reference_kept']}; "
        f"target tokens {c['reference_tgt_tokens']:,} -> {c['tgt_tokens']:,} (longest {c['tgt_max_len']})"
    )
