"""Small samples of real text and a trained model shipped with janus, for the embedded defaults of
its benchmarks and for trying janus without training first.

``libreoffice_sample()``: the first 500 German-English sentence pairs of the test split of a
LibreOffice help corpus (Mozilla Public License 2.0: see NOTICE and LICENSE.MPL-2.0 in this folder).

``builtin_model("de-en")``: a small German -> English JANUS model trained on the training split of
that corpus (``de-en/MODEL.md``: recipe, budget, the command that rebuilds it, its test BLEU per
decoding mode). Every command and function that takes a checkpoint takes it as ``builtin:de-en``.
Its sentencepiece model (8000 pieces) is the sample's vocabulary too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What ``builtin:NAME`` names: a folder of this package holding an averaged checkpoint (model.safetensors with
# its sha256 in average.json, config.json, spm.model).
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"de-en": "de-en"}


@dataclass(frozen=True)
class ParallelSample:
    """Aligned sentences (one per entry) and the vocabulary they were sized with."""

    name: str
    src_lang: str
    tgt_lang: str
    source: list[str]
    target: list[str]
    spm_model: Path


def libreoffice_sample() -> ParallelSample:
    """The 500 LibreOffice help test sentence pairs (de -> en) and their sentencepiece model."""
    source = (HERE / "libreoffice.de").read_text(encoding="utf-8").splitlines()
    target = (HERE / "libreoffice.en").read_text(encoding="utf-8").splitlines()
    if len(source) != len(target):
        raise ValueError(f"{HERE}: libreoffice.de has {len(source)} lines but libreoffice.en {len(target)}")
    return ParallelSample(f"libreoffice-de-en ({len(source)} test pairs)", "de", "en", source, target,
                          HERE / BUILTIN_MODELS["de-en"] / "spm.model")  # fmt: skip


def is_builtin(name: object) -> bool:
    """Whether ``name`` (a string or path) is a ``builtin:NAME`` model name."""
    return str(name).startswith(BUILTIN_PREFIX)


def builtin_model(name: str) -> Path:
    """The folder of the built-in model ``name`` ("de-en", or "builtin:de-en").

    Raises:
        FileNotFoundError: an unknown name (the message lists the known ones), or a folder without its
            weights (an install that left the package data out).
    """
    key = name[len(BUILTIN_PREFIX) :] if is_builtin(name) else name
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise FileNotFoundError(f"{BUILTIN_PREFIX}{key}: no such built-in model (there is {known})")
    folder = HERE / BUILTIN_MODELS[key]
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{BUILTIN_PREFIX}{key}: {folder} has no model.safetensors; "
                                "was janus installed without its package data?")  # fmt: skip
    return folder
