"""Text -> ids -> batches: corpus preparation, binary shards, masking, token-budget batching.

``prepare`` (the body of ``janus prepare``) reads raw parallel text, trains the
joint sentencepiece vocabulary and writes, into ``destdir``::

    spm.model                  the joint vocabulary (janus.vocab)
    {split}.{lang}.bin         int32 ids of every kept sentence, back to back, no bos/eos
    {split}.{lang}.idx         int64 offsets [N + 1]: sentence i is bin[idx[i]:idx[i + 1]]
    {split}.lines              int64 [N]: 1-based line number of kept pair i in the raw text
    manifest.json              counts, filters, hashes, the PrepareConfig (written last)

``Dataset`` opens one split of that folder. ``make_batches`` groups examples of
similar length into batches under a padded token budget; ``iterate_updates``
deals the batches of an epoch to updates, ranks and accumulation steps;
``iterate_batches`` walks a split in a fixed order for validation. Masks follow
JANUS.md section 1 and depend only on (seed, epoch, example id), never on how
examples were grouped into batches.

Target layout of one sentence: y = [bos, w1 .. wk, eos], n = k + 2. The source
is [x1 .. xs, eos] (no bos).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from janus import __version__
from janus.config import PrepareConfig, SpecialIds, TrainConfig
from janus.ops.pad_batch import pad_batch
from janus.vocab import Vocab

FORMAT = "janus-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "spm.model"
SPLITS = ("train", "valid", "test")
FILTER_REASONS = ("empty", "too_long")
SPECIALS = SpecialIds()

# Salts keep the random streams of masking, tie-breaking and batch order apart
# even when they are seeded with the same (seed, epoch).
_MASK_SALT = 0x4D41534B  # "MASK"
_ORDER_SALT = 0x4F524452  # "ORDR"
_TIE_SALT = 0x54494553  # "TIES"

PathLike = str | Path


# ====================================================================== files


def atomic_write(path: PathLike, data: bytes | str | np.ndarray) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The data goes to a temporary file in the same folder, is flushed and fsynced,
    and then renamed over ``path`` (``os.replace``). On any error the temporary
    file is removed.

    Args:
        path: destination file.
        data: bytes, str (written as UTF-8) or a numpy array (its raw C-order bytes).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 honours the umask (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, np.ndarray):
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            elif isinstance(data, str):
                f.write(data.encode("utf-8"))
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable (best effort; not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_lines(path: PathLike) -> tuple[list[str], str]:
    """Read a UTF-8 text file as lines, strictly.

    Only the line terminator (``\\n`` or ``\\r\\n``) is removed; other whitespace and
    characters such as form feeds stay, so line i here is line i of ``wc -l``. A
    UTF-8 byte-order mark at the start of the file is dropped.

    Args:
        path: the file.
    Returns:
        (lines, sha256 hex digest of the file's bytes).
    Raises:
        ValueError: bytes that are not UTF-8; names the file, the 1-based line and the byte offset.
    """
    path = Path(path)
    raw = path.read_bytes()
    return split_lines(raw, str(path)), hashlib.sha256(raw).hexdigest()


def split_lines(raw: bytes, name: str) -> list[str]:
    """Decode UTF-8 bytes into lines like ``read_lines``; ``name`` (a file, "<stdin>") goes in errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # '\n' never occurs inside a multi-byte UTF-8 sequence, so decoding the whole
        # file is the same as decoding line by line; the error position gives the line.
        line_no = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{name}: line {line_no} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start} "
            f"of the file, column {e.start - line_start + 1} of the line: {e.reason}); "
            f"convert the file to UTF-8 or remove that line"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the terminator of the last line, not an extra empty line
    return [s[:-1] if s.endswith("\r") else s for s in lines]


# ====================================================================== prepare


def _split_prefixes(cfg: PrepareConfig) -> list[tuple[str, str]]:
    if not cfg.trainpref:
        raise ValueError("PrepareConfig.trainpref is required (training text is PREFIX.SRC / PREFIX.TGT)")
    if cfg.src == cfg.tgt:
        raise ValueError(f"source and target suffixes are both {cfg.src!r}")
    prefs = {"train": cfg.trainpref, "valid": cfg.validpref, "test": cfg.testpref}
    return [(name, prefs[name]) for name in SPLITS if prefs[name]]


def _read_split(prefix: str, src: str, tgt: str) -> dict:
    src_path, tgt_path = Path(f"{prefix}.{src}"), Path(f"{prefix}.{tgt}")
    for p in (src_path, tgt_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (expected PREFIX.{src} and PREFIX.{tgt} for prefix {prefix!r})")
    src_lines, src_hash = read_lines(src_path)
    tgt_lines, tgt_hash = read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"line counts differ: {src_path} has {len(src_lines)} lines, {tgt_path} has {len(tgt_lines)} lines; "
            f"the two sides of a parallel corpus must align line by line"
        )
    return dict(
        src_path=src_path, tgt_path=tgt_path, src=src_lines, tgt=tgt_lines, src_hash=src_hash, tgt_hash=tgt_hash
    )


def _encode_all(vocab: Vocab, texts: list[str], bar, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``texts`` chunk by chunk -> (int32 flat ids [T], int64 lengths [N]).

    Each chunk is flattened right away, so peak memory holds one chunk of Python lists.
    """
    flats, lengths = [], []
    for i in range(0, len(texts), chunk):
        part = texts[i : i + chunk]
        ids = vocab.encode(part)
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(n.sum())))
        lengths.append(n)
        bar.update(len(part))
    if not flats:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    return np.concatenate(flats), np.concatenate(lengths)


def _select(flat: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the sentences where ``keep`` (bool [N]) is True -> (flat [T'], offsets int64 [N' + 1])."""
    flat = flat[np.repeat(keep, lengths)]
    lengths = lengths[keep]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, offsets


def prepare(cfg: PrepareConfig, *, verbose: bool = True) -> dict:
    """Raw parallel text -> joint sentencepiece model + binary shards + manifest (``janus prepare``).

    Steps: (1) read and validate every split (train required; valid/test when their
    prefix is set); (2) drop pairs with an empty side (whitespace only; text that
    sentencepiece normalises to no token at all counts as empty too); (3) train the joint vocabulary
    on the remaining training text of both sides; (4) encode every split and drop
    pairs with more than ``cfg.max_len`` tokens on either side (``max_len <= 0``:
    no limit); (5) write the shards and, last, ``manifest.json``. Every file is
    written atomically and an old manifest is removed first, so a folder with a
    manifest is a finished one. Filtered pairs are counted, printed (one line per
    split) and recorded in the manifest, never dropped silently.

    Args:
        cfg: the PrepareConfig.
        verbose: print the per-split summary and show encoding progress.
    Returns:
        The manifest (also written to ``destdir/manifest.json``).
    Raises:
        ValueError: misaligned line counts, non-UTF-8 text, no training pair left,
            or sentencepiece rejecting the settings.
    """
    started = time.perf_counter()
    splits = _split_prefixes(cfg)
    dest = Path(cfg.destdir)
    # 1. Read everything before spending time on the vocabulary (or touching the destination).
    raw = {name: _read_split(prefix, cfg.src, cfg.tgt) for name, prefix in splits}
    existed = dest.exists()
    ours = not existed or not any(dest.iterdir())  # nothing of the user's is in it
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)
    try:
        return _prepare_into(cfg, dest, raw, started, verbose)
    except BaseException:
        if ours:  # a failed or interrupted run leaves no half-made folder behind (an empty one it was given stays)
            shutil.rmtree(dest, ignore_errors=True)
            if existed:
                dest.mkdir()
        raise


def _prepare_into(cfg: PrepareConfig, dest: Path, raw: dict[str, dict], started: float, verbose: bool) -> dict:
    """Steps 2-5 of ``prepare`` into the folder ``dest`` from the read splits ``raw``."""
    # 2. Empty sides.
    for r in raw.values():
        nonempty = [i for i, (s, t) in enumerate(zip(r["src"], r["tgt"], strict=True)) if s.strip() and t.strip()]
        r["keep"] = nonempty
        r["filtered"] = {"empty": len(r["src"]) - len(nonempty), "too_long": 0}
    train = raw["train"]
    if not train["keep"]:
        raise ValueError(
            f"no training pair is left after dropping empty lines in {train['src_path']} / {train['tgt_path']}"
        )

    # 3. Joint vocabulary on the non-empty training text of both sides.
    vocab_path = dest / VOCAB_FILE
    work = Path(tempfile.mkdtemp(dir=dest, prefix=".spm-"))
    try:
        text_file = work / "train.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for side in ("src", "tgt"):
                lines = train[side]
                f.write("\n".join(lines[i] for i in train["keep"]))
                f.write("\n")
        n_text = 2 * len(train["keep"])
        Vocab.train(
            [text_file],
            work / "spm",
            vocab_size=cfg.vocab_size,
            model_type=cfg.spm_model_type,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.spm_input_sentence_size if cfg.spm_input_sentence_size > 0 else n_text,
            threads=cfg.threads,
        )
        atomic_write(vocab_path, (work / "spm.model").read_bytes())
        atomic_write(dest / "spm.vocab", (work / "spm.vocab").read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vocab = Vocab(vocab_path, threads=cfg.threads)

    # 4. Encode, filter by length, write shards.
    total = sum(2 * len(r["keep"]) for r in raw.values())
    manifest_splits: dict[str, dict] = {}
    inputs: dict[str, str] = {}
    with tqdm(total=total, desc="encode", unit="sent", disable=not verbose, file=sys.stderr) as bar:
        for name, r in raw.items():
            keep = r["keep"]
            src_flat, src_len = _encode_all(vocab, [r["src"][i] for i in keep], bar)
            tgt_flat, tgt_len = _encode_all(vocab, [r["tgt"][i] for i in keep], bar)
            ok = (src_len > 0) & (tgt_len > 0)  # text that sentencepiece normalises away entirely
            r["filtered"]["empty"] += int((~ok).sum())
            if cfg.max_len > 0:
                too_long = ok & ((src_len > cfg.max_len) | (tgt_len > cfg.max_len))
                r["filtered"]["too_long"] = int(too_long.sum())
                ok &= ~too_long
            sel = np.flatnonzero(ok)
            src_flat, src_off = _select(src_flat, src_len, ok)
            tgt_flat, tgt_off = _select(tgt_flat, tgt_len, ok)
            src_len, tgt_len = np.diff(src_off), np.diff(tgt_off)
            lines = np.asarray(keep, dtype=np.int64)[sel] + 1
            for lang, flat, off in ((cfg.src, src_flat, src_off), (cfg.tgt, tgt_flat, tgt_off)):
                atomic_write(dest / f"{name}.{lang}.bin", flat)
                atomic_write(dest / f"{name}.{lang}.idx", off)
            atomic_write(dest / f"{name}.lines", lines)

            info = {
                "pairs": len(r["src"]),
                "kept": int(sel.size),
                "filtered": dict(r["filtered"]),
                "src_tokens": int(src_off[-1]),
                "tgt_tokens": int(tgt_off[-1]),
                "src_max_len": int(src_len.max()) if sel.size else 0,
                "tgt_max_len": int(tgt_len.max()) if sel.size else 0,
                "files": {"src": str(r["src_path"]), "tgt": str(r["tgt_path"])},
                "sha256": {"src": r["src_hash"], "tgt": r["tgt_hash"]},
            }
            manifest_splits[name] = info
            inputs[str(r["src_path"])] = r["src_hash"]
            inputs[str(r["tgt_path"])] = r["tgt_hash"]

    if verbose:
        for name, info in manifest_splits.items():
            f = info["filtered"]
            print(
                f"{name}: {info['pairs']} pairs read, {info['kept']} kept, {sum(f.values())} filtered "
                f"(empty {f['empty']}, too long {f['too_long']} [max_len {cfg.max_len}]); "
                f"tokens {cfg.src} {info['src_tokens']} (max {info['src_max_len']}), "
                f"{cfg.tgt} {info['tgt_tokens']} (max {info['tgt_max_len']})"
            )

    # 5. The manifest, last.
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "janus_version": __version__,
        "src": cfg.src,
        "tgt": cfg.tgt,
        "vocab": VOCAB_FILE,
        "vocab_size": len(vocab),
        "specials": dataclasses.asdict(SPECIALS),
        "splits": manifest_splits,
        "inputs_sha256": inputs,
        "config": dataclasses.asdict(cfg),
    }
    _fsync_dir(dest)
    atomic_write(dest / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if verbose:
        print(f"prepared {dest} in {time.perf_counter() - started:.1f} s")
    _fsync_dir(dest)
    return manifest


def load_manifest(destdir: PathLike) -> dict:
    """Read ``destdir/manifest.json`` and check its format.

    Raises:
        FileNotFoundError: no manifest (prepare did not run or did not finish).
        ValueError: a manifest of another format or version.
    """
    path = Path(destdir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {destdir} is not a finished `janus prepare` output; run janus prepare"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this janus reads {FORMAT!r} version {FORMAT_VERSION}: re-run janus prepare"
        )
    return manifest


# ====================================================================== dataset


def _open_shard(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Memory-map ``count`` items of ``dtype`` from ``path``, read-only, checking the size."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is missing; re-run janus prepare")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != count * itemsize:
        raise ValueError(
            f"shard {path} is corrupt or short: {size} bytes, expected {count * itemsize} "
            f"({count} x {np.dtype(dtype).name}); re-run janus prepare"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _as_tensor(a: np.ndarray) -> Tensor:
    # The shards are mapped read-only; the tensors are only ever read (gathered by pad_batch).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class Dataset:
    """One split of a prepared folder, memory-mapped.

    Attributes:
        src_lengths, tgt_lengths: int64 [N], token counts without specials.
        lines: int64 [N], 1-based line numbers in the raw text.
        src_flat, tgt_flat: torch int32 [T_src], [T_tgt], all ids back to back.
        src_offsets, tgt_offsets: torch int64 [N + 1].
        manifest: the folder's manifest; info: this split's entry in it.
    """

    def __init__(self, destdir: PathLike, split: str):
        """Open ``split`` ("train", "valid", "test") of the folder written by ``prepare``.

        Raises:
            FileNotFoundError: no manifest, or a missing shard.
            KeyError: the split was not prepared.
            ValueError: a shard whose size or offsets disagree with the manifest.
        """
        self.destdir = Path(destdir)
        self.split = split
        self.manifest = load_manifest(self.destdir)
        if split not in self.manifest["splits"]:
            raise KeyError(
                f"split {split!r} was not prepared in {self.destdir}; found {sorted(self.manifest['splits'])}"
            )
        self.info = self.manifest["splits"][split]
        self.src_lang, self.tgt_lang = self.manifest["src"], self.manifest["tgt"]
        n = int(self.info["kept"])
        arrays = {}
        for side, lang in (("src", self.src_lang), ("tgt", self.tgt_lang)):
            idx_path = self.destdir / f"{split}.{lang}.idx"
            bin_path = self.destdir / f"{split}.{lang}.bin"
            off = _open_shard(idx_path, np.int64, n + 1)
            tokens = int(self.info[f"{side}_tokens"])
            if off[0] != 0 or off[-1] != tokens or (n and np.any(off[1:] < off[:-1])):
                raise ValueError(
                    f"shard {idx_path} is corrupt: offsets must rise from 0 to {tokens}, "
                    f"found first {int(off[0])}, last {int(off[-1])}; re-run janus prepare"
                )
            flat = _open_shard(bin_path, np.int32, tokens)
            arrays[side] = (flat, off)
        self._src_bin, self._src_idx = arrays["src"]
        self._tgt_bin, self._tgt_idx = arrays["tgt"]
        self.lines = _open_shard(self.destdir / f"{split}.lines", np.int64, n)
        self.src_lengths = np.diff(self._src_idx).astype(np.int64)
        self.tgt_lengths = np.diff(self._tgt_idx).astype(np.int64)
        self.src_flat, self.src_offsets = _as_tensor(self._src_bin), _as_tensor(self._src_idx)
        self.tgt_flat, self.tgt_offsets = _as_tensor(self._tgt_bin), _as_tensor(self._tgt_idx)
        self._sort_key: np.ndarray | None = None
        self._batch_cache: dict[tuple, list[np.ndarray]] = {}

    @property
    def vocab_path(self) -> Path:
        """The folder's sentencepiece model."""
        return self.destdir / self.manifest["vocab"]

    def __len__(self) -> int:
        return len(self.src_lengths)

    def __repr__(self) -> str:
        return f"Dataset({str(self.destdir)!r}, {self.split!r}, examples={len(self)})"

    def src(self, i: int) -> np.ndarray:
        """int32 [k_src] ids of source sentence ``i`` (a read-only view, no specials)."""
        return self._src_bin[self._src_idx[i] : self._src_idx[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        """int32 [k] ids of target sentence ``i`` (a read-only view, no specials)."""
        return self._tgt_bin[self._tgt_idx[i] : self._tgt_idx[i + 1]]

    def widths(self) -> np.ndarray:
        """int64 [N]: padded width each example needs in a batch, max(src_len + 1, tgt_len + 2)."""
        return np.maximum(self.src_lengths + 1, self.tgt_lengths + 2)

    def sort_key(self) -> np.ndarray:
        """int64 [N]: orders examples by (tgt length, src length); computed once."""
        if self._sort_key is None:
            self._sort_key = self.tgt_lengths * (int(self.src_lengths.max(initial=0)) + 1) + self.src_lengths
        return self._sort_key


# ====================================================================== masking


@dataclass(frozen=True)
class Masking:
    """The masking scheme of training targets (JANUS.md section 1).

    kind: "span" (JANUS: budget ceil(ratio * n), span lengths ~ Poisson(lam)),
        "uniform" (CMLM: m ~ U{1..k} distinct positions) or "none" (no mask).
    ratio: span budget as a share of n (default 0.7).
    lam: Poisson mean of span lengths (default 2.0).
    """

    kind: str = "span"
    ratio: float = 0.7
    lam: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("span", "uniform", "none"):
            raise ValueError(f"masking kind {self.kind!r}; choose span, uniform or none")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"mask ratio {self.ratio} must be in (0, 1]")
        if self.lam < 0:
            raise ValueError(f"span lambda {self.lam} must be >= 0")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Masking:
        """The masking a TrainConfig asks for ("none" for the ar objective, which needs no mask)."""
        if cfg.objective == "ar":
            return cls(kind="none", ratio=cfg.mask_ratio, lam=cfg.span_lambda)
        return cls(kind=cfg.masking_kind(), ratio=cfg.mask_ratio, lam=cfg.span_lambda)

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """bool [n] mask of a target of length n (bos and eos included in n)."""
        if self.kind == "span":
            return span_mask(n, self.ratio, self.lam, rng)
        if self.kind == "uniform":
            return uniform_mask(n, rng)
        return np.zeros(n, dtype=bool)


def span_mask(n: int, ratio: float, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Span masking of a target of length n = k + 2.

    budget = min(ceil(ratio * n), k); repeat: L ~ Poisson(lam) clamped to
    [1, remaining budget], a start drawn uniformly so that the span lies inside
    1..n-2, mark it (overlaps allowed, so fewer than ``budget`` positions may end
    up masked), remaining -= L; until the budget is spent. k >= 1 gives at least
    one masked position; k == 0 gives none.

    Args:
        n: target length with bos and eos.
        ratio: budget share of n, in (0, 1].
        lam: Poisson mean of the span lengths.
        rng: the sentence's generator (``mask_rng``).
    Returns:
        bool [n], True at masked positions (never 0 or n-1).
    """
    mask = np.zeros(n, dtype=bool)
    k = n - 2
    if k <= 0:
        return mask
    # The epsilon keeps float error (0.7 * 10 = 7.000000000000001) from adding one.
    budget = min(math.ceil(ratio * n - 1e-9), k)
    # Each span uses at least one unit of budget, so `budget` draws always suffice;
    # drawing them at once is much faster than one call per span.
    lengths = rng.poisson(lam, size=budget).tolist()
    uniforms = rng.random(size=budget).tolist()
    remaining = budget
    for length, u in zip(lengths, uniforms, strict=True):
        length = min(max(length, 1), remaining)
        start = 1 + int(u * (n - 1 - length))  # uniform in 1 .. n-1-length, so the span ends <= n-2
        mask[start : start + length] = True
        remaining -= length
        if remaining == 0:
            break
    return mask


def uniform_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """CMLM masking: m ~ U{1..k}, then m distinct positions uniformly from 1..n-2.

    Args:
        n: target length with bos and eos (k = n - 2).
        rng: the sentence's generator (``mask_rng``).
    Returns:
        bool [n]; no position masked when k == 0.
    """
    mask = np.zeros(n, dtype=bool)
    k = n - 2
    if k <= 0:
        return mask
    m = int(rng.integers(1, k + 1))
    mask[1 + rng.permutation(k)[:m]] = True
    return mask


def mask_rng(seed: int, epoch: int, example_id: int) -> np.random.Generator:
    """The generator of one sentence's mask: a function of (seed, epoch, example id) only."""
    return np.random.default_rng([int(seed), int(epoch), int(example_id), _MASK_SALT])


# ====================================================================== batches


@dataclass
class Batch:
    """A padded batch of B examples.

    src: int64 [B, S], x + [eos], padded with pad (no bos).
    tgt: int64 [B, T], [bos] + y + [eos], padded with pad.
    masked: bool [B, T], True at masked target positions (never bos, eos or pad).
    ids: int64 [B], example indices in the split.
    src_lengths: int64 [B], source lengths with eos.
    tgt_lengths: int64 [B], n = k + 2, target lengths with bos and eos.
    counts: host-side (sentences, src tokens, tgt tokens, masked) so the count
        properties never synchronise with a device; filled by ``collate``.
    """

    src: Tensor
    tgt: Tensor
    masked: Tensor
    ids: Tensor
    src_lengths: Tensor
    tgt_lengths: Tensor
    counts: tuple[int, int, int, int] | None = field(default=None, repr=False)

    def _counts(self) -> tuple[int, int, int, int]:
        if self.counts is None:
            self.counts = (
                int(self.ids.numel()),
                int(self.src_lengths.sum()),
                int(self.tgt_lengths.sum()),
                int(self.masked.sum()),
            )
        return self.counts

    @property
    def num_sentences(self) -> int:
        """B."""
        return self._counts()[0]

    @property
    def num_src_tokens(self) -> int:
        """Source tokens with eos, pad excluded."""
        return self._counts()[1]

    @property
    def num_tgt_tokens(self) -> int:
        """Target tokens with bos and eos (sum of n), pad excluded."""
        return self._counts()[2]

    @property
    def num_masked(self) -> int:
        """Masked target positions (m summed over the batch)."""
        return self._counts()[3]

    def _map(self, fn) -> Batch:
        return Batch(
            src=fn(self.src),
            tgt=fn(self.tgt),
            masked=fn(self.masked),
            ids=fn(self.ids),
            src_lengths=fn(self.src_lengths),
            tgt_lengths=fn(self.tgt_lengths),
            counts=self.counts,
        )

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device`` (non_blocking pays off from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned host memory (for non-blocking copies to a GPU)."""
        return self._map(lambda t: t.pin_memory())


def collate(dataset: Dataset, ids: np.ndarray | Sequence[int], masking: Masking, seed: int, epoch: int) -> Batch:
    """Gather, pad and mask the examples ``ids`` of ``dataset``.

    Args:
        dataset: the split.
        ids: int [B] example indices, in batch order.
        masking: the masking scheme; sentence i's mask uses ``mask_rng(seed, epoch, i)``.
        seed, epoch: the mask seeds.
    Returns:
        The Batch.
    """
    ids = np.asarray(ids, dtype=np.int64)
    index = torch.from_numpy(ids.copy())
    src = pad_batch(dataset.src_flat, dataset.src_offsets, index, SPECIALS.pad, -1, SPECIALS.eos)
    tgt = pad_batch(dataset.tgt_flat, dataset.tgt_offsets, index, SPECIALS.pad, SPECIALS.bos, SPECIALS.eos)
    src_lengths = dataset.src_lengths[ids] + 1
    tgt_lengths = dataset.tgt_lengths[ids] + 2
    masked = np.zeros(tuple(tgt.shape), dtype=bool)
    if masking.kind != "none":
        for b, (i, n) in enumerate(zip(ids.tolist(), tgt_lengths.tolist(), strict=True)):
            masked[b, :n] = masking(n, mask_rng(seed, epoch, i))
    counts = (len(ids), int(src_lengths.sum()), int(tgt_lengths.sum()), int(masked.sum()))
    return Batch(
        src=src,
        tgt=tgt,
        masked=torch.from_numpy(masked),
        ids=index,
        src_lengths=torch.from_numpy(src_lengths),
        tgt_lengths=torch.from_numpy(tgt_lengths),
        counts=counts,
    )


def _check_fits(dataset: Dataset, widths: np.ndarray, max_tokens: int) -> None:
    over = np.flatnonzero(widths > max_tokens)
    if over.size:
        i = int(over[np.argmax(widths[over])])
        raise ValueError(
            f"{over.size} example(s) of split {dataset.split!r} do not fit max_tokens={max_tokens}; the longest is "
            f"example {i} (line {int(dataset.lines[i])}: {int(dataset.src_lengths[i])} source and "
            f"{int(dataset.tgt_lengths[i])} target tokens, padded width {int(widths[i])}); "
            f"raise max_tokens to at least {int(widths.max())} or prepare the data with a lower max_len"
        )


def _cut(order: np.ndarray, widths: np.ndarray, max_tokens: int, max_sentences: int) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches with size * max width <= max_tokens."""
    bounds = [0]
    start, cur = 0, 0
    for i, w in enumerate(widths[order].tolist()):
        size = i - start + 1
        wide = w if w > cur else cur
        if size * wide > max_tokens or (max_sentences and size > max_sentences):
            bounds.append(i)
            start, wide = i, w
        cur = wide
    bounds.append(len(order))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def make_batches(
    dataset: Dataset,
    max_tokens: int,
    max_sentences: int = 0,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """Length-bucketed batches under a padded token budget.

    Examples are ordered by (tgt length, src length), ties broken by a shuffle
    seeded with (seed, epoch); the order is cut into consecutive batches with
    ``len(batch) * max(max(src_len + 1, tgt_len + 2)) <= max_tokens`` (fairseq's
    padded budget) and at most ``max_sentences`` examples (0 = no limit); then the
    batch order is shuffled with (seed, epoch). With ``shuffle=False`` ties keep
    index order and batches stay in length order (validation). Results are
    cached per argument set.

    Args:
        dataset: the split.
        max_tokens: padded token budget of one batch.
        max_sentences: cap on examples per batch (0 = none).
        seed, epoch: seeds of the tie-break and the batch order.
        shuffle: False for a fixed, length-sorted order.
    Returns:
        A list of int64 [B_i] arrays of example indices (read-only), every example exactly once.
    Raises:
        ValueError: an example wider than max_tokens (names its line and length).
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be positive")
    key = (int(max_tokens), int(max_sentences), int(seed), int(epoch), bool(shuffle))
    cached = dataset._batch_cache.get(key)
    if cached is not None:
        return list(cached)
    widths = dataset.widths()
    _check_fits(dataset, widths, max_tokens)
    sort_key = dataset.sort_key()
    if shuffle:
        perm = np.random.default_rng([int(seed), int(epoch), _TIE_SALT]).permutation(len(dataset))
        order = perm[np.argsort(sort_key[perm], kind="stable")]
    else:
        order = np.argsort(sort_key, kind="stable")
    batches = _cut(order.astype(np.int64), widths, max_tokens, max_sentences)
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch), _ORDER_SALT])
        batches = [batches[j] for j in rng.permutation(len(batches))]
    for b in batches:
        b.flags.writeable = False
    if len(dataset._batch_cache) >= 4:
        dataset._batch_cache.pop(next(iter(dataset._batch_cache)))
    dataset._batch_cache[key] = batches
    return list(batches)


def num_updates(
    dataset: Dataset,
    max_tokens: int,
    seed: int,
    epoch: int,
    update_freq: int = 1,
    world_size: int = 1,
    max_sentences: int = 0,
) -> int:
    """Updates in one epoch: floor(num_batches / (world_size * update_freq)).

    The remaining ``num_batches mod (world_size * update_freq)`` batches are skipped
    in that epoch; the batch order is reshuffled every epoch, so different batches
    are skipped each time.
    """
    return len(make_batches(dataset, max_tokens, max_sentences, seed, epoch)) // (world_size * update_freq)


def iterate_updates(
    dataset: Dataset,
    max_tokens: int,
    seed: int,
    epoch: int,
    masking: Masking,
    update_freq: int = 1,
    world_size: int = 1,
    rank: int = 0,
    start_update: int = 0,
    max_sentences: int = 0,
) -> Iterator[list[Batch]]:
    """The batches this rank processes in each update of an epoch.

    With W = world_size and A = update_freq, update u uses the global batches
    u*W*A .. (u+1)*W*A - 1 of ``make_batches(dataset, max_tokens, max_sentences,
    seed, epoch)``, and rank r takes batches u*W*A + a*W + r for a = 0..A-1. There
    are ``num_updates`` updates; the remainder is skipped (see ``num_updates``).
    Batches and masks depend only on (seed, epoch, u), so starting at
    ``start_update`` yields exactly the tail of an uninterrupted epoch (resume).

    Args:
        dataset: the training split.
        max_tokens: padded token budget of one batch.
        seed, epoch: seeds of batch order and masks.
        masking: the masking scheme.
        update_freq: A, batches accumulated per update per rank.
        world_size, rank: W and r of data-parallel training.
        start_update: first update to yield (0..num_updates).
        max_sentences: cap on examples per batch (0 = none).
    Yields:
        For each update u >= start_update, a list of A Batch objects.
    Raises:
        ValueError: bad rank/sizes, start_update past the end, or fewer batches than one update needs.
    """
    if update_freq < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need update_freq >= 1 and 0 <= rank < world_size; got {update_freq}, {rank}, {world_size}")
    batches = make_batches(dataset, max_tokens, max_sentences, seed, epoch)
    per_update = world_size * update_freq
    total = len(batches) // per_update
    if total == 0:
        raise ValueError(
            f"split {dataset.split!r} makes {len(batches)} batches at max_tokens={max_tokens}, fewer than the "
            f"{per_update} (world_size {world_size} x update_freq {update_freq}) one update needs; lower max_tokens"
        )
    if not 0 <= start_update <= total:
        raise ValueError(f"start_update={start_update} is outside 0..{total} (updates in epoch {epoch})")
    for u in range(start_update, total):
        base = u * per_update
        yield [
            collate(dataset, batches[base + a * world_size + rank], masking, seed, epoch) for a in range(update_freq)
        ]


def iterate_batches(
    dataset: Dataset,
    max_tokens: int,
    masking: Masking,
    seed: int,
    epoch: int = 0,
    max_sentences: int = 0,
) -> Iterator[Batch]:
    """Every example of the split once, in a fixed length-sorted order (validation).

    Args:
        dataset: the split.
        max_tokens: padded token budget of one batch.
        masking: the masking scheme (seeded by (seed, epoch, example id)).
        seed, epoch: mask seeds.
        max_sentences: cap on examples per batch (0 = none).
    Yields:
        Batch objects.
    """
    for ids in make_batches(dataset, max_tokens, max_sentences, seed, epoch, shuffle=False):
        yield collate(dataset, ids, masking, seed, epoch)
