"""Shared fixtures. Markers (triton, cpp, gpu, slow) are declared in pyproject.toml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The development corpus: $JANUS_SHARED_DATA or ../shared/data beside the repository."""
    return Path(os.environ.get("JANUS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder holding libreoffice-de-en/{train,valid,test}.{de,en}; a missing corpus is an error."""
    root = shared_data_dir()
    corpus = root / "libreoffice-de-en"
    if not (corpus / "train.de").is_file():
        raise FileNotFoundError(
            f"development corpus not found at {corpus}; set JANUS_SHARED_DATA to the folder holding libreoffice-de-en/"
        )
    return root
