"""Small samples of real text shipped with janus, for the embedded defaults of its benchmarks.

``libreoffice_sample()``: 64 German-English sentence pairs from the LibreOffice help
and the 8000-piece sentencepiece model of that corpus (Mozilla Public License 2.0:
see NOTICE and LICENSE.MPL-2.0 in this folder). Nothing else in janus reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
    """The 64 LibreOffice help sentence pairs (de -> en) and their sentencepiece model."""
    source = (HERE / "libreoffice.de").read_text(encoding="utf-8").splitlines()
    target = (HERE / "libreoffice.en").read_text(encoding="utf-8").splitlines()
    if len(source) != len(target):
        raise ValueError(f"{HERE}: libreoffice.de has {len(source)} lines but libreoffice.en {len(target)}")
    return ParallelSample("libreoffice-de-en (64 test pairs)", "de", "en", source, target,
                          HERE / "libreoffice.spm.model")  # fmt: skip
