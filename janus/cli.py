"""The ``janus`` command line: prepare, train, average, translate, evaluate, distill.

Flags are generated from the config dataclasses (``janus.config``), so every
option and its default is documented once, on the dataclass field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from janus.config import DecodeConfig, ModelConfig, PrepareConfig, TrainConfig
from janus.memory import keep_freed_memory

# ModelConfig fields not offered as overrides: the vocabulary decides these, and dropout is
# TrainConfig.dropout.
_MODEL_FIXED = {"vocab_size", "specials", "dropout"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(
    parser: argparse._ActionsContainer, cls: type, *, optional: bool = False, exclude: frozenset[str] = frozenset()
) -> None:
    """Add one ``--field-name`` flag per field of dataclass ``cls`` (help = the field's doc).

    With ``optional`` every default is None (the flag overrides something else only when given).
    Fields named in ``exclude`` get no flag.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (f.name in _MODEL_FIXED and cls is ModelConfig) or f.name in exclude:
            continue
        typ = hints[f.name]
        default = None if optional else f.default
        shown = "from the preset" if optional else repr(f.default)
        helptext = f.metadata.get("help", "")
        if typ is bool:
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{helptext} (default: {shown})",
            )
        elif typ in (int, float, str):
            parser.add_argument(
                _flag(f.name),
                type=typ,
                default=default,
                metavar=typ.__name__.upper(),
                help=f"{helptext} (default: {shown})",
            )


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="janus", description="Train one Transformer to decode AR and NAR (JANUS).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Every flag's help states its default itself (add_dataclass_args): no ArgumentDefaultsHelpFormatter.
    pp = sub.add_parser("prepare", help="train a joint sentencepiece model and write binary shards")
    add_dataclass_args(pp, PrepareConfig)

    tp = sub.add_parser("train", help="train (or resume) a model")
    add_dataclass_args(tp, TrainConfig)
    mg = tp.add_argument_group("model", "override fields of the preset (ignored when resuming)")
    add_dataclass_args(mg, ModelConfig, optional=True)

    ap = sub.add_parser("average", help="average the weights of the last N checkpoints")
    ap.add_argument("--save-dir", default="", help="checkpoint folder of a training run (or --inputs)")
    ap.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints (default: 5)")
    ap.add_argument("--inputs", nargs="*", default=None, help="explicit checkpoint folders instead of --last")
    ap.add_argument("--output", required=True, help="output folder of the averaged checkpoint")
    ap.add_argument("--dtype", default="", choices=["", "float32", "float16", "bfloat16"],
                    help="write the weights in this dtype (float16: half the size, to ship a model; "
                         "default: the checkpoints' own)")  # fmt: skip

    xp = sub.add_parser(
        "translate",
        help="decode raw text, one sentence per line, in any mode",
        description="Decode one sentence per input line into one output line, in input order. Empty and "
        "whitespace-only lines give empty lines; over-long lines are truncated with a warning.",
    )
    _add_model_args(xp)
    xp.add_argument("--input", default="-", help="UTF-8 text, one sentence per line (default: -, stdin)")
    xp.add_argument(
        "--output",
        default="-",
        help="hypotheses, one per line, written (and flushed) as soon as every earlier line is done; an "
        "interrupted run leaves the finished lines (default: -, stdout)",
    )
    xp.add_argument(
        "--resume",
        action="store_true",
        help="continue --output FILE after its last complete line (a partial last line is cut off); "
        "give the same input and options as the interrupted run",
    )
    _add_run_args(xp)
    add_dataclass_args(xp.add_argument_group("decoding"), DecodeConfig)

    ep = sub.add_parser(
        "evaluate",
        help="decode a test set in several modes and score it with sacreBLEU (BLEU, chrF)",
        description="Decode --src in every mode of --modes with the same options, time it, and score the "
        "hypotheses against --ref with sacreBLEU BLEU and chrF.",
    )
    _add_model_args(ep)
    ep.add_argument("--src", required=True, help="source text, one sentence per line")
    ep.add_argument("--ref", required=True, help="reference text, aligned line by line with --src")
    ep.add_argument("--modes", default="ar,nar", help="comma-separated modes from ar, nar, spec (default: ar,nar)")
    ep.add_argument("--output-json", default=None, help="write the scores, settings and timings to this JSON file")
    ep.add_argument("--hyp-prefix", default=None, help="write the hypotheses of each mode to PREFIX.<mode>")
    _add_run_args(ep)
    add_dataclass_args(ep.add_argument_group("decoding (every mode)"), DecodeConfig, exclude=frozenset({"mode"}))

    dp = sub.add_parser(
        "distill",
        help="sequence-level knowledge distillation: a prepared folder whose targets are a model's beam outputs",
        description="Translate the train (and valid) sources of a prepared folder with the checkpoint's AR beam "
        "search and write a new prepared folder (same vocabulary, same sources; test copied unchanged) whose "
        "targets are the model's outputs, for janus train --data DESTDIR. Resumable: a rerun continues after "
        "the last complete chunk.",
    )
    dp.add_argument("--data", required=True, help="folder written by janus prepare, with the checkpoint's vocabulary")
    _add_model_args(dp)
    dp.add_argument("--destdir", required=True, help="the new prepared folder (new, empty, or an unfinished run's)")
    dp.add_argument(
        "--keep-valid", action="store_true", help="copy the real valid targets instead of distilling the valid split"
    )
    dp.add_argument(
        "--truncated",
        choices=("keep", "reference"),
        default="keep",
        help="outputs that reached max_len_a * source + max_len_b tokens: keep them as decoded, or keep the real "
        "target instead (empty outputs always keep the real target; both are counted) (default: keep)",
    )
    dp.add_argument(
        "--chunk-size",
        type=int,
        default=2000,  # janus.distill.DEFAULT_CHUNK_SIZE (not imported here: it would load torch for --help)
        metavar="INT",
        help="sentences decoded and saved together; a killed run loses at most one chunk (default: 2000)",
    )
    _add_run_args(dp)
    add_dataclass_args(
        dp.add_argument_group("decoding (AR beam search)"),
        DecodeConfig,
        exclude=_NOT_BEAM_SEARCH,
    )
    return p


# DecodeConfig fields that beam search ignores (mask-predict's and spec's): no flags for janus distill.
_NOT_BEAM_SEARCH = frozenset(
    {"mode", "iterations", "length_beam", "rerank", "length_weight", "dedup", "history", "window"}
    | {f.name for f in dataclasses.fields(DecodeConfig) if f.name.startswith(("draft_", "verify_"))}
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, averaged folder, training folder (its latest), or builtin:de-en (the model shipped "
        "with janus)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, or int8 (CPU: int8 linear layers)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm bar on stderr: sentences and generated tokens/s (default: on when stderr is a terminal)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = the CPUs this process may use minus those the 1-minute load average "
        "says are busy, at least 1 (default: 0)",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``janus`` command; returns the exit status.

    Bad input (files, values) ends with a one-line ``janus COMMAND: error: ...`` and
    status 2; ``JANUS_DEBUG=1`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if args.command in ("translate", "evaluate") and "torch" not in sys.modules:
        # Idle OpenMP threads sleep instead of spinning (read when torch loads libgomp): on a busy
        # machine spinning threads steal the cores the working ones wait for (README: CPU threads).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"janus {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return _run(args)
    except KeyboardInterrupt:
        print(f"janus {args.command}: interrupted", file=sys.stderr)
        if args.command == "train":
            print("the last complete checkpoint is intact: run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("JANUS_DEBUG") == "1":
            raise
        print(f"janus {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from janus.data import prepare

        prepare(dataclass_from_args(PrepareConfig, args))
    elif args.command == "train":
        from janus.train import train

        cfg = dataclass_from_args(TrainConfig, args)
        model_names = {f.name for f in dataclasses.fields(ModelConfig)} - _MODEL_FIXED
        overrides = {k: v for k, v in vars(args).items() if k in model_names and v is not None}
        result = train(cfg, overrides)
        if result:
            print(json.dumps({"valid": result}))
    elif args.command == "average":
        import torch

        from janus.checkpoint import average_checkpoints, last_checkpoints

        if not args.inputs and not args.save_dir:
            raise ValueError("janus average needs --save-dir (its last --last checkpoints) or --inputs")
        paths = [Path(x) for x in args.inputs] if args.inputs else last_checkpoints(Path(args.save_dir), args.last)
        out = average_checkpoints(paths, Path(args.output), dtype=getattr(torch, args.dtype) if args.dtype else None)
        print(f"averaged {len(paths)} checkpoints -> {out}")
    elif args.command == "translate":
        _translate(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "distill":
        _distill(args)
    return 0


# ====================================================================== translate / evaluate

_MODES = ("ar", "nar", "spec")


def auto_threads() -> tuple[int, str]:
    """(threads, why): the CPUs this process may use minus those busy with other work.

    Busy CPUs are the 1-minute load average, rounded. OpenMP threads wait for each other at
    every parallel region, so one thread that loses its core to another process stalls them
    all: on 2 busy cores, 2 threads decoded 40x slower than alone while 1 thread kept its pace.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = int(load + 0.5)
    return max(1, min(cpus, cpus - busy)), f"{cpus} CPUs, 1-minute load {load:.1f}"


def _set_threads(args: argparse.Namespace, command: str) -> int:
    """Set torch's CPU threads from ``--threads`` (0 = ``auto_threads``) and say so on stderr."""
    import torch

    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: give a positive count, or 0 to choose from the load")
    if args.threads:
        n, why = args.threads, "--threads"
    else:
        n, why = auto_threads()
        why = f"auto: {why}; --threads N to choose"
    torch.set_num_threads(n)
    print(f"janus {command}: {n} CPU thread{'s' * (n != 1)} ({why})", file=sys.stderr)
    return n


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _load_generator(args: argparse.Namespace) -> Any:
    from janus.api import Generator

    gen = Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    if gen.vocab is None:
        raise ValueError(f"{args.checkpoint}: no vocabulary (spm.model) beside the checkpoint; text needs one")
    return gen


def _encode_lines(
    gen: Any, lines: Sequence[str], options: DecodeConfig, name: str, command: str, first: int = 0
) -> list[list[int]]:
    """Source ids per line: empty for empty or whitespace-only lines (never decoded), truncated to
    ``gen.source_limit(options)`` tokens with a warning on stderr naming the line (``lines[0]`` is
    line ``first + 1`` of ``name``)."""
    index = [i for i, line in enumerate(lines) if line.strip()]
    ids: list[list[int]] = [[] for _ in lines]
    for i, encoded in zip(index, gen.encode([lines[i] for i in index]) if index else []):
        ids[i] = encoded

    def report(i: int, n: int, limit: int) -> None:
        print(f"janus {command}: warning: {name}: line {first + i + 1} has {n} tokens; truncated to the first {limit}",
              file=sys.stderr)  # fmt: skip

    gen.truncate(ids, options, report)
    return ids


def _one_line(text: Optional[str]) -> str:
    """A hypothesis as exactly one output line."""
    return (text or "").replace("\r", " ").replace("\n", " ")


def complete_lines(path: Path) -> int:
    """Newline-terminated lines at the start of ``path`` (0 if it does not exist); bytes after the
    last newline (a line cut by a kill) are removed from the file, so appending continues cleanly."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        print(f"janus translate: {path}: removing a partial last line ({len(data) - keep} bytes)", file=sys.stderr)
        os.truncate(path, keep)
    return data.count(b"\n", 0, keep)


# An output file is fsynced at most this often (and at the end): a kill loses nothing that was
# written (the kernel has it), a machine crash at most this many seconds of lines.
_FSYNC_SECONDS = 10.0


def _translate(args: argparse.Namespace) -> None:
    from janus.data import read_lines, split_lines

    options = dataclass_from_args(DecodeConfig, args)
    if args.resume and args.output == "-":
        raise ValueError("--resume needs --output FILE: it continues that file after its last complete line")
    lines = None
    if args.input != "-":
        lines = read_lines(args.input)[0]  # bad input fails before the model is loaded
    gen = _load_generator(args)
    _set_threads(args, "translate")
    if lines is None:
        lines = split_lines(sys.stdin.buffer.read(), "<stdin>")
    name = "<stdin>" if args.input == "-" else args.input
    done = 0
    if args.resume:
        done = complete_lines(Path(args.output))
        if done > len(lines):
            raise ValueError(f"--resume: {args.output} has {done} lines but {name} only {len(lines)}; "
                             "it is not the output of this input")  # fmt: skip
        print(f"janus translate: {args.output}: {done} of {len(lines)} lines done; continuing", file=sys.stderr)
    ids = _encode_lines(gen, lines[done:], options, name, "translate", first=done)
    to_file = args.output != "-"
    out = open(args.output, "ab" if args.resume else "wb") if to_file else sys.stdout.buffer  # noqa: SIM115
    synced = time.monotonic()
    try:
        for h in gen.generate_iter(ids, options, progress=_show_progress(args)) if ids else []:
            # One write per line, flushed: a reader (or a later --resume) sees whole lines as they come.
            out.write((_one_line(h.text) + "\n").encode("utf-8"))
            out.flush()
            if to_file and time.monotonic() - synced > _FSYNC_SECONDS:
                os.fsync(out.fileno())
                synced = time.monotonic()
        if to_file:
            os.fsync(out.fileno())
    finally:
        if to_file:
            out.close()


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in _MODES]
    if not modes or bad:
        raise ValueError(f"--modes {text!r}: give a comma-separated list from {', '.join(_MODES)}")
    return list(dict.fromkeys(modes))  # in order, without repeats


def _mode_settings(options: DecodeConfig) -> str:
    """The options that matter for ``options.mode``, shortly (the table's settings column)."""
    if options.mode == "ar":
        text = f"beam {options.beam_size}"
    elif options.mode == "nar":
        text = (
            f"T={options.iterations} l={options.length_beam}"
            + (" rerank" if options.rerank else "")
            + (f" lw {options.length_weight:g}" if options.length_weight else "")
            + (" dedup" if options.dedup else "")
        )
    else:
        block = options.draft_block or "all"
        text = f"draft {options.draft_iterations} {options.draft_policy} k={block}"
        if options.draft_align != "lookup":
            text += f" {options.draft_align}"
        if options.verify_top_beta > 1:
            text += f" relaxed top-{options.verify_top_beta} tol {options.verify_tolerance:g}"
    if options.mode != "nar" and options.length_penalty != 1.0:
        text += f" lp {options.length_penalty:g}"
    return text


def _evaluate(args: argparse.Namespace) -> None:
    import sacrebleu
    import torch
    from sacrebleu.metrics import BLEU, CHRF

    import janus
    from janus.data import atomic_write, read_lines
    from janus.samples import is_builtin

    modes = _parse_modes(args.modes)
    base = dataclass_from_args(DecodeConfig, args)
    src, _ = read_lines(args.src)
    ref, _ = read_lines(args.ref)
    if len(src) != len(ref):
        raise ValueError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}; they must be aligned")
    if not src:
        raise ValueError(f"{args.src} is empty: nothing to evaluate")
    gen = _load_generator(args)
    _set_threads(args, "evaluate")
    ids = _encode_lines(gen, src, base, args.src, "evaluate")
    warmup = [s for s in ids if s][:1]
    progress = _show_progress(args)

    results: dict[str, dict[str, Any]] = {}
    signatures: dict[str, str] = {}
    for mode in modes:
        options = dataclasses.replace(base, mode=mode)
        if warmup:  # first-call costs (allocations, kernel selection) stay out of the timing
            gen.generate(warmup, options)
        start = time.perf_counter()
        hyps = gen.generate(ids, options, progress=progress)
        seconds = time.perf_counter() - start
        print(f"janus evaluate: {mode}: {len(hyps)} sentences in {seconds:.2f} s ({len(hyps) / max(seconds, 1e-9):.1f}"
              f" sent/s, {sum(len(h.ids) for h in hyps) / max(seconds, 1e-9):.0f} tok/s)", file=sys.stderr)  # fmt: skip
        texts = [_one_line(h.text) for h in hyps]
        bleu, chrf = BLEU(), CHRF()
        bleu_score = bleu.corpus_score(texts, [ref])
        chrf_score = chrf.corpus_score(texts, [ref])
        signatures = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
        results[mode] = {
            "settings": _mode_settings(options),
            "options": dataclasses.asdict(options),
            "bleu": bleu_score.score,
            "bleu_detail": str(bleu_score),
            "chrf": chrf_score.score,
            "bleu_signature": signatures["bleu"],
            "chrf_signature": signatures["chrf"],
            "mean_passes": sum(h.passes for h in hyps) / len(hyps),
            "seconds": seconds,
            "sentences_per_second": len(hyps) / seconds if seconds > 0 else float("inf"),
            "sentences": len(hyps),
        }
        if args.hyp_prefix:
            atomic_write(f"{args.hyp_prefix}.{mode}", "".join(t + "\n" for t in texts))

    header = ("mode", "settings", "BLEU", "chrF", "passes/sent", "seconds", "sent/s")
    rows = [
        (
            mode,
            r["settings"],
            f"{r['bleu']:.2f}",
            f"{r['chrf']:.2f}",
            f"{r['mean_passes']:.2f}",
            f"{r['seconds']:.2f}",
            f"{r['sentences_per_second']:.1f}",
        )
        for mode, r in results.items()
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    left = {0, 1}  # text columns; numbers are right-aligned
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) if c in left else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))).rstrip())
    print(f"BLEU signature: {signatures['bleu']}")
    print(f"chrF signature: {signatures['chrf']}")

    if args.output_json:
        doc = {
            "checkpoint": args.checkpoint if is_builtin(args.checkpoint) else str(Path(args.checkpoint).resolve()),
            "src": str(Path(args.src).resolve()),
            "ref": str(Path(args.ref).resolve()),
            "sentences": len(src),
            "device": str(gen.device),
            "dtype": str(gen.dtype).removeprefix("torch."),
            "versions": {"janus": janus.__version__, "torch": torch.__version__, "sacrebleu": sacrebleu.__version__},
            "signatures": signatures,
            "modes": results,
        }
        atomic_write(args.output_json, json.dumps(doc, indent=2) + "\n")


# ====================================================================== distill


def _distill(args: argparse.Namespace) -> None:
    if "torch" not in sys.modules:  # as for translate and evaluate (README: CPU threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from janus.distill import distill

    options = dataclasses.replace(dataclass_from_args(DecodeConfig, args), mode="ar")
    _set_threads(args, "distill")
    try:
        distill(
            args.data,
            args.checkpoint,
            args.destdir,
            options,
            keep_valid=args.keep_valid,
            truncated=args.truncated,
            chunk_size=args.chunk_size,
            device=args.device,
            dtype=args.dtype,
            progress=_show_progress(args),
        )
    except KeyboardInterrupt:
        print(f"janus distill: the decoded chunks in {args.destdir} are kept: run the same command to resume",
              file=sys.stderr)  # fmt: skip
        raise


if __name__ == "__main__":
    sys.exit(main())
