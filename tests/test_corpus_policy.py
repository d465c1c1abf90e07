"""The suite's rule for the full development corpus (tests/conftest.py): only tests marked `corpus`
may read it, and they skip with the reason where it is absent, so a clone with nothing beside it passes."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
MARKER = "corpus: reads the full development corpus"

TESTS = """
import pytest

@pytest.mark.corpus
def test_marked(shared_data):
    assert (shared_data / "libreoffice-de-en" / "train.de").read_text() == "hallo\\n"

def test_plain():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makeini(f"[pytest]\nmarkers =\n    {MARKER}\naddopts = --strict-markers -p no:cacheprovider\n")
    return pytester


def test_corpus_tests_skip_with_their_reason_where_the_corpus_is_absent(suite, monkeypatch, tmp_path):
    monkeypatch.setenv("JANUS_SHARED_DATA", str(tmp_path / "nothing"))
    suite.makepyfile(test_x=TESTS)
    result = suite.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*development corpus not found at*nothing*libreoffice-de-en*JANUS_SHARED_DATA*"])


def test_corpus_tests_run_where_the_corpus_is(suite, monkeypatch, tmp_path):
    corpus = tmp_path / "shared" / "libreoffice-de-en"
    corpus.mkdir(parents=True)
    (corpus / "train.de").write_text("hallo\n")
    monkeypatch.setenv("JANUS_SHARED_DATA", str(tmp_path / "shared"))
    suite.makepyfile(test_x=TESTS)
    suite.runpytest().assert_outcomes(passed=2)


def test_an_unmarked_test_cannot_read_the_corpus(suite, monkeypatch, tmp_path):
    monkeypatch.setenv("JANUS_SHARED_DATA", str(tmp_path))
    suite.makepyfile(
        test_x="""
import pytest

@pytest.fixture(scope="module")
def prepared(shared_data):
    return shared_data

def test_indirect(prepared):
    pass
"""
    )
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*shared_data fixture without the `corpus` marker*test_x.py::test_indirect*"])


def test_the_shipped_slice_is_aligned(test_corpus):
    for split, n in (("train", 3000), ("valid", 150), ("test", 150)):
        de = (test_corpus / f"{split}.de").read_text(encoding="utf-8").splitlines()
        en = (test_corpus / f"{split}.en").read_text(encoding="utf-8").splitlines()
        assert len(de) == len(en) == n
        assert all(line.strip() for line in de + en)
