"""The ``janus`` command line: prepare, train, average.

Flags are generated from the config dataclasses (``janus.config``), so every
option and its default is documented once, on the dataclass field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from janus.config import ModelConfig, PrepareConfig, TrainConfig

# ModelConfig fields not offered as overrides: the vocabulary decides these, and dropout is
# TrainConfig.dropout.
_MODEL_FIXED = {"vocab_size", "specials", "dropout"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse._ActionsContainer, cls: type, *, optional: bool = False) -> None:
    """Add one ``--field-name`` flag per field of dataclass ``cls`` (help = the field's doc).

    With ``optional`` every default is None (the flag overrides something else only when given).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _MODEL_FIXED and cls is ModelConfig:
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

    pp = sub.add_parser(
        "prepare",
        help="train a joint sentencepiece model and write binary shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_args(pp, PrepareConfig)

    tp = sub.add_parser("train", help="train (or resume) a model")
    add_dataclass_args(tp, TrainConfig)
    mg = tp.add_argument_group("model", "override fields of the preset (ignored when resuming)")
    add_dataclass_args(mg, ModelConfig, optional=True)

    ap = sub.add_parser("average", help="average the weights of the last N checkpoints")
    ap.add_argument("--save-dir", required=True, help="checkpoint folder of a training run")
    ap.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints (default: 5)")
    ap.add_argument("--inputs", nargs="*", default=None, help="explicit checkpoint folders instead of --last")
    ap.add_argument("--output", required=True, help="output folder of the averaged checkpoint")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``janus`` command; returns the exit status.

    Bad input (files, values) ends with a one-line ``janus COMMAND: error: ...`` and
    status 2; ``JANUS_DEBUG=1`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    try:
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
        from janus.checkpoint import average_checkpoints, last_checkpoints

        paths = [Path(x) for x in args.inputs] if args.inputs else last_checkpoints(Path(args.save_dir), args.last)
        out = average_checkpoints(paths, Path(args.output))
        print(f"averaged {len(paths)} checkpoints -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
