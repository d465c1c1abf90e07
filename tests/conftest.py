"""Shared fixtures. Markers (triton, cpp, gpu, slow) are declared in pyproject.toml.

Triton kernels run on the CPU through Triton's interpreter in the tests of a CPU-only
torch: TRITON_INTERPRET=1 is set here, before any kernel module is imported (triton
reads it when a kernel is defined). With a CUDA build of torch the kernels run on the
GPU; set TRITON_INTERPRET=1 yourself to interpret them there too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]  # tests/test_corpus_policy.py runs this conftest on small test files

if torch.version.cuda is None:  # a build property, not a device query
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The test slice that travels with the repository (tests/data/NOTICE): real parallel text for
# every test that needs some, so that a clone with nothing beside it passes.
TEST_CORPUS = REPO / "tests" / "data" / "libreoffice-de-en"


def shared_data_dir() -> Path:
    """The full development corpus: $JANUS_SHARED_DATA or ../shared/data beside the repository."""
    return Path(os.environ.get("JANUS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared_corpus_missing() -> str:
    """Why the full corpus cannot be read ("" when it can)."""
    corpus = shared_data_dir() / "libreoffice-de-en"
    if (corpus / "train.de").is_file():
        return ""
    return f"development corpus not found at {corpus} (set JANUS_SHARED_DATA to the folder holding libreoffice-de-en/)"


def _uses_shared_data(item: pytest.Item) -> bool:
    return "shared_data" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Only `corpus` tests may read the full corpus; they skip, with the reason, where it is absent."""
    unmarked = [item.nodeid for item in items if _uses_shared_data(item) and item.get_closest_marker("corpus") is None]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the shared_data fixture without the `corpus` marker (a clone with nothing beside it "
            "has no full corpus: mark them @pytest.mark.corpus, or use the slice in tests/data): " + ", ".join(unmarked)
        )
    missing = _shared_corpus_missing()
    if missing:
        skip = pytest.mark.skip(reason=missing)
        for item in items:
            if item.get_closest_marker("corpus") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder holding the full libreoffice-de-en/{train,valid,test}.{de,en}; only for `corpus` tests."""
    missing = _shared_corpus_missing()
    if missing:  # only reached when a corpus test is run with its skip overridden
        raise FileNotFoundError(missing)
    return shared_data_dir()


@pytest.fixture(scope="session")
def test_corpus() -> Path:
    """The slice shipped in tests/data: libreoffice-de-en/{train (3000), valid (150), test (150)}.{de,en}."""
    return TEST_CORPUS


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """A tiny janus model trained (about a minute on 2 CPU cores) on a word-for-word code.

    Returns a namespace: ``checkpoint`` (its last checkpoint folder, with spm.model),
    ``raw`` (the text folder: {train,valid,test}.{src,tgt}), ``data`` (the prepared folder),
    ``test_src`` / ``test_ref`` (the 100 test sentences and their references).
    """
    from types import SimpleNamespace

    from data_helpers import make_mapping_pairs, mapping_vocab_size, write_corpus

    from janus.checkpoint import latest_checkpoint
    from janus.config import PrepareConfig, TrainConfig
    from janus.data import prepare, read_lines
    from janus.train import train

    root = tmp_path_factory.mktemp("synthetic")
    sizes = {"train": 4000, "valid": 100, "test": 100}
    splits = {name: make_mapping_pairs(n, seed) for seed, (name, n) in enumerate(sizes.items(), 1)}
    raw = write_corpus(root / "raw", splits, "src", "tgt")
    prefix = {name: str(raw / name) for name in splits}
    prepare(
        PrepareConfig(src="src", tgt="tgt", trainpref=prefix["train"], validpref=prefix["valid"],
                      testpref=prefix["test"], destdir=str(root / "bin"), vocab_size=mapping_vocab_size()),
        verbose=False,
    )  # fmt: skip
    steps = 400
    cfg = TrainConfig(data=str(root / "bin"), save_dir=str(root / "run"), preset="tiny", objective="janus",
                      max_tokens=2048, warmup_steps=30, lr=5e-3, max_steps=steps, validate_interval=steps,
                      save_interval=steps, dropout=0.0, progress=False, log_interval=steps, seed=1)  # fmt: skip
    train(cfg)
    return SimpleNamespace(
        checkpoint=latest_checkpoint(root / "run"),
        raw=raw,
        data=root / "bin",
        test_src=read_lines(raw / "test.src")[0],
        test_ref=read_lines(raw / "test.tgt")[0],
    )
