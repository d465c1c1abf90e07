"""janus distill: a prepared folder whose targets are the model's AR beam outputs.

The synthetic model (conftest) translates a word-for-word code; distilling a small slice of its
prepared folder (the same vocabulary, a few hundred pairs) takes seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import janus.distill as distill_module
from janus.api import Generator
from janus.cli import main
from janus.config import DecodeConfig, PrepareConfig
from janus.data import Dataset, prepare
from janus.distill import distill

SIZES = {"train": 150, "valid": 24, "test": 20}
CHUNK = 40  # four chunks of train: the resume test interrupts after the first


def _slice_folder(source: Path, dest: Path, sizes: dict[str, int]) -> Path:
    """The first ``sizes[split]`` pairs of each split of the prepared ``source``, same vocabulary."""
    manifest = json.loads((source / "manifest.json").read_text())
    dest.mkdir(parents=True)
    for name in ("spm.model", "spm.vocab"):
        shutil.copyfile(source / name, dest / name)
    splits = {}
    for split, n in sizes.items():
        ds = Dataset(source, split)
        info = dict(manifest["splits"][split], kept=n)
        for side, lang in (("src", ds.src_lang), ("tgt", ds.tgt_lang)):
            offsets = np.asarray(getattr(ds, f"{side}_offsets")[: n + 1], dtype=np.int64)
            flat = np.asarray(getattr(ds, f"{side}_flat")[: int(offsets[-1])], dtype=np.int32)
            flat.tofile(dest / f"{split}.{lang}.bin")
            offsets.tofile(dest / f"{split}.{lang}.idx")
            info[f"{side}_tokens"] = int(offsets[-1])
            info[f"{side}_max_len"] = int(np.diff(offsets).max())
        np.asarray(ds.lines[:n], dtype=np.int64).tofile(dest / f"{split}.lines")
        splits[split] = info
    (dest / "manifest.json").write_text(json.dumps(dict(manifest, splits=splits), indent=2))
    return dest


def _sources(folder: Path, split: str) -> list[list[int]]:
    ds = Dataset(folder, split)
    return [ds.src(i).tolist() for i in range(len(ds))]


def _targets(folder: Path, split: str) -> list[list[int]]:
    ds = Dataset(folder, split)
    return [ds.tgt(i).tolist() for i in range(len(ds))]


def _same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def small_data(synthetic_model, tmp_path_factory) -> Path:
    return _slice_folder(synthetic_model.data, tmp_path_factory.mktemp("slice") / "bin", SIZES)


@pytest.fixture(scope="module")
def distilled(small_data, synthetic_model, tmp_path_factory) -> Path:
    """An uninterrupted distill of ``small_data`` with the defaults (beam 5) in chunks of CHUNK."""
    dest = tmp_path_factory.mktemp("distilled") / "out"
    distill(small_data, synthetic_model.checkpoint, dest, chunk_size=CHUNK, device="cpu", verbose=False)
    return dest


def test_targets_are_the_models_beam_outputs_and_the_rest_is_copied(small_data, distilled, synthetic_model):
    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    for split in ("train", "valid"):
        ds = Dataset(distilled, split)
        assert len(ds) == SIZES[split]
        expected = [h.ids for h in gen.generate(_sources(small_data, split), DecodeConfig(mode="ar", beam_size=5))]
        assert _targets(distilled, split) == expected, split
        # the model knows the code: its outputs are the references here, but they came from decoding
        assert sum(a == b for a, b in zip(expected, _targets(small_data, split), strict=True)) >= 0.9 * len(expected)
    lang = Dataset(small_data, "train").manifest
    src, tgt = lang["src"], lang["tgt"]
    for split in ("train", "valid", "test"):
        for name in (f"{split}.{src}.bin", f"{split}.{src}.idx", f"{split}.lines"):
            assert _same_file(small_data / name, distilled / name), name
    for name in (f"test.{tgt}.bin", f"test.{tgt}.idx", "spm.model", "spm.vocab"):
        assert _same_file(small_data / name, distilled / name), name

    manifest = json.loads((distilled / "manifest.json").read_text())
    source = json.loads((small_data / "manifest.json").read_text())
    assert manifest["splits"]["test"] == dict(source["splits"]["test"], targets="reference")
    assert manifest["splits"]["train"]["targets"] == "distilled"
    assert manifest["splits"]["train"]["tgt_tokens"] == sum(map(len, _targets(distilled, "train")))
    record = manifest["distill"]
    assert record["source"] == str(small_data.resolve())
    assert record["checkpoint"] == str(Path(synthetic_model.checkpoint).resolve())
    assert record["settings"]["decode"]["beam_size"] == 5 and record["settings"]["decode"]["mode"] == "ar"
    assert record["settings"]["chunk_size"] == CHUNK
    for split in ("train", "valid"):
        counts = record["splits"][split]
        assert counts["sentences"] == SIZES[split]
        assert counts["empty"] == counts["truncated"] == counts["source_truncated"] == counts["reference_kept"] == 0
    assert record["splits"]["test"] == {"targets": "reference"}
    assert not (distilled / ".distill").exists()


def test_a_finished_folder_is_not_redone(small_data, distilled, synthetic_model, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in distilled.iterdir()}
    manifest = distill(small_data, synthetic_model.checkpoint, distilled, chunk_size=CHUNK, device="cpu")
    assert "already distilled with these settings; nothing to do" in capsys.readouterr().out
    assert manifest == json.loads((distilled / "manifest.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in distilled.iterdir()} == before
    with pytest.raises(ValueError, match=r"was distilled with other settings \(decode\.beam_size: 5 -> 3\)"):
        distill(small_data, synthetic_model.checkpoint, distilled, DecodeConfig(mode="ar", beam_size=3),
                chunk_size=CHUNK, device="cpu")  # fmt: skip


def test_resume_after_a_kill_equals_the_uninterrupted_run(small_data, distilled, synthetic_model, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    dest = tmp_path / "out"
    save = distill_module._save_chunk
    saved = []

    def killed_after_one_chunk(path, arrays):
        if saved:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between two chunks) leaves
        save(path, arrays)
        saved.append(path.name)

    monkeypatch.setattr(distill_module, "_save_chunk", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        distill(small_data, synthetic_model.checkpoint, dest, chunk_size=CHUNK, device="cpu")
    assert saved == ["train.000000.npz"]
    # nothing that looks finished: no manifest, no shard
    assert sorted(p.name for p in dest.iterdir()) == [".distill"]
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        Dataset(dest, "train")
    unfinished = r"holds an unfinished distillation with other settings \(chunk_size: 40 -> 50\)"
    with pytest.raises(ValueError, match=unfinished):
        distill(small_data, synthetic_model.checkpoint, dest, chunk_size=50, device="cpu")

    def counted(path, arrays):
        saved.append(path.name)
        save(path, arrays)

    monkeypatch.setattr(distill_module, "_save_chunk", counted)
    capsys.readouterr()
    distill(small_data, synthetic_model.checkpoint, dest, chunk_size=CHUNK, device="cpu")
    total = SIZES["train"] + SIZES["valid"]
    assert f"resuming: {CHUNK} of {total} sentences already distilled" in capsys.readouterr().out
    chunks = math.ceil(SIZES["train"] / CHUNK) + math.ceil(SIZES["valid"] / CHUNK)
    assert len(saved) == chunks  # the first chunk was not decoded again
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in distilled.iterdir())
    for p in distilled.iterdir():
        if p.name != "manifest.json":
            assert _same_file(p, dest / p.name), p.name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (distilled, dest))
    for m in (a, b):
        for counts in m["distill"]["splits"].values():
            counts.pop("seconds", None)
    assert a == b


def test_empty_and_truncated_outputs_are_counted_and_handled(small_data, synthetic_model, tmp_path):
    # At most floor(0.4 * source tokens) target tokens: none for 2-token sources (eos at once: empty),
    # too few for every other (the code maps word for word): truncated.
    options = DecodeConfig(mode="ar", beam_size=2, max_len_a=0.4, max_len_b=0, min_len=0)
    sources, real = _sources(small_data, "train"), _targets(small_data, "train")
    limits = [math.floor(0.4 * len(s) + 1e-9) for s in sources]
    assert all(len(t) == len(s) for s, t in zip(sources, real, strict=True))  # one piece per word both sides
    want_empty = sum(m == 0 for m in limits)
    want_truncated = len(sources) - want_empty
    assert 0 < want_empty < len(sources)
    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    outputs = [h.ids for h in gen.generate(sources, options)]
    assert [len(o) for o in outputs] == limits

    kept = distill(small_data, synthetic_model.checkpoint, tmp_path / "keep", options, keep_valid=True,
                   chunk_size=CHUNK, device="cpu", verbose=False)  # fmt: skip
    counts = kept["distill"]["splits"]["train"]
    assert (counts["empty"], counts["truncated"], counts["source_truncated"]) == (want_empty, want_truncated, 0)
    assert counts["reference_kept"] == want_empty
    expected = [t if not o else o for o, t in zip(outputs, real, strict=True)]  # empty -> the real target
    assert _targets(tmp_path / "keep", "train") == expected
    assert kept["distill"]["splits"]["valid"] == {"targets": "reference (--keep-valid)"}
    assert _targets(tmp_path / "keep", "valid") == _targets(small_data, "valid")

    replaced = distill(small_data, synthetic_model.checkpoint, tmp_path / "ref", options, keep_valid=True,
                       truncated="reference", chunk_size=CHUNK, device="cpu", verbose=False)  # fmt: skip
    counts = replaced["distill"]["splits"]["train"]
    assert (counts["empty"], counts["truncated"], counts["reference_kept"]) == (want_empty, want_truncated, len(real))
    assert _targets(tmp_path / "ref", "train") == real


def test_bad_input_is_a_clear_error(small_data, synthetic_model, tmp_path):
    ckpt = synthetic_model.checkpoint
    with pytest.raises(FileNotFoundError, match="--data /nonexistent does not exist"):
        distill("/nonexistent", ckpt, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="is neither a checkpoint folder"):
        distill(small_data, tmp_path / "no-checkpoint", tmp_path / "a")
    with pytest.raises(ValueError, match="is the --data folder itself"):
        distill(small_data, ckpt, small_data)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--destdir {foreign} exists and is not a janus distill output"):
        distill(small_data, ckpt, foreign, device="cpu")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="holds a prepared folder that janus distill did not write"):
        distill(small_data, ckpt, synthetic_model.data, device="cpu")
    with pytest.raises(ValueError, match="distill decodes with AR beam search; got mode='nar'"):
        distill(small_data, ckpt, tmp_path / "a", DecodeConfig(mode="nar"))
    with pytest.raises(ValueError, match="truncated='drop': choose keep or reference"):
        distill(small_data, ckpt, tmp_path / "a", truncated="drop")
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        distill(small_data, ckpt, tmp_path / "a", chunk_size=0)

    no_train = _slice_folder(synthetic_model.data, tmp_path / "no-train", {"valid": 5, "test": 5})
    with pytest.raises(ValueError, match=f"{no_train} has no train split"):
        distill(no_train, ckpt, tmp_path / "a")

    # A folder with a vocabulary of its own: the same kind of text, another sentencepiece model.
    raw = synthetic_model.raw
    other = tmp_path / "other-vocab"
    prepare(PrepareConfig(src="src", tgt="tgt", trainpref=str(raw / "valid"), destdir=str(other), vocab_size=30,
                          threads=1), verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="vocabulary mismatch") as e:
        distill(other, ckpt, tmp_path / "a", device="cpu")
    assert str(Path(ckpt) / "spm.model") in str(e.value) and str(other / "spm.model") in str(e.value)
    assert not (tmp_path / "a").exists()  # no check above touched the destination


def test_cli_distills_and_train_reads_the_result(small_data, synthetic_model, tmp_path, capsys):
    dest = tmp_path / "out"
    argv = ["distill", "--data", str(small_data), "--checkpoint", str(synthetic_model.checkpoint),
            "--destdir", str(dest), "--beam-size", "2", "--chunk-size", "100", "--device", "cpu", "--threads", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train: 150 sentences distilled" in out and "empty 0, truncated 0 (kept)" in out
    assert "test: real targets copied" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["distill"]["settings"]["decode"]["beam_size"] == 2
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out

    assert main(["distill", "--data", str(small_data), "--checkpoint", str(synthetic_model.checkpoint),
                 "--destdir", str(small_data), "--threads", "1"]) == 2  # fmt: skip
    assert "janus distill: error: --destdir" in capsys.readouterr().err

    save_dir = tmp_path / "student"
    code = main(["train", "--data", str(dest), "--save-dir", str(save_dir), "--preset", "tiny", "--objective", "cmlm",
                 "--max-tokens", "512", "--max-steps", "3", "--warmup-steps", "1", "--save-interval", "3",
                 "--validate-interval", "3", "--threads", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    assert (save_dir / "checkpoint_00000003" / "model.safetensors").is_file()


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as done:
        main(["distill", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for entry in text.split(" --")[1:]:
        assert entry.count("(default:") <= 1, entry
    assert f"(default: {distill_module.DEFAULT_CHUNK_SIZE})" in text and "--beam-size INT" in text
    assert "--iterations" not in text and "--window" not in text
    assert "--draft-" not in text and "--verify-" not in text  # spec's options are not beam search's
