"""``janus translate`` and ``janus evaluate`` end to end on the synthetic model."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

from janus.api import Generator
from janus.cli import main
from janus.data import read_lines

REPO = Path(__file__).resolve().parents[1]
AR_GREEDY = ["--mode", "ar", "--beam-size", "1", "--device", "cpu"]


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def test_translate_file_and_stdin_give_the_references(synthetic_model, capsys, monkeypatch):
    ckpt = str(synthetic_model.checkpoint)
    n = len(synthetic_model.test_src)
    assert main(["translate", "--checkpoint", ckpt, "--input", str(synthetic_model.raw / "test.src"), *AR_GREEDY]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and out.out.count("\n") == n
    assert out.out.splitlines() == synthetic_model.test_ref
    assert re.fullmatch(r"janus translate: \d+ CPU threads? \(auto: \d+ CPUs, 1-minute load [\d.]+; .*\)\n", out.err)

    _stdin(monkeypatch, (synthetic_model.raw / "test.src").read_bytes())
    assert main(["translate", "--checkpoint", ckpt, *AR_GREEDY]) == 0  # --input defaults to stdin
    out = capsys.readouterr()
    assert out.out.count("\n") == n
    assert out.out.splitlines() == synthetic_model.test_ref


def test_translate_output_file_and_empty_lines(synthetic_model, tmp_path, capsys):
    src, ref = synthetic_model.test_src, synthetic_model.test_ref
    lines = ["", src[0], "   ", src[1], "\t \t", src[2], ""]
    expected = ["", ref[0], "", ref[1], "", ref[2], ""]
    inp = _write(tmp_path / "in.txt", lines)
    hyp = tmp_path / "hyp.txt"
    args = ["translate", "--checkpoint", str(synthetic_model.checkpoint), "--input", str(inp), "--output", str(hyp)]
    assert main([*args, *AR_GREEDY]) == 0
    assert capsys.readouterr().out == ""  # everything went to the file
    assert hyp.read_bytes() == "".join(t + "\n" for t in expected).encode("utf-8")
    assert read_lines(hyp)[0] == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing

    # a training folder works as --checkpoint too (its latest checkpoint)
    hyp2 = tmp_path / "hyp2.txt"
    run_dir = str(synthetic_model.checkpoint.parent)
    assert main(["translate", "--checkpoint", run_dir, "--input", str(inp), "--output", str(hyp2), *AR_GREEDY]) == 0
    assert hyp2.read_bytes() == hyp.read_bytes()


def test_translate_truncates_long_lines_with_a_warning(synthetic_model, tmp_path, capsys):
    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    pairs = zip(synthetic_model.test_src, synthetic_model.test_ref, gen.encode(synthetic_model.test_src))
    short = [(s, r) for s, r, ids in pairs if len(ids) <= 5][:2]
    assert len(short) == 2
    long = " ".join([synthetic_model.test_src[3]] * 20)
    ids = gen.encode([long])[0]
    assert len(ids) > 5
    inp = _write(tmp_path / "long.txt", [short[0][0], long, short[1][0]])
    ckpt = str(synthetic_model.checkpoint)
    argv = ["translate", "--checkpoint", ckpt, "--input", str(inp), "--max-source-len", "5", "--threads", "1"]
    assert main([*argv, *AR_GREEDY]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines()[0] == "janus translate: 1 CPU thread (--threads)"
    assert f"{inp}: line 2 has {len(ids)} tokens; truncated to the first 5" in out.err
    assert out.err.count("\n") == 2  # the threads, and one warning: only the long line
    # the short lines are untouched; the long one is the translation of its first 5 tokens
    expected = gen.generate([ids[:5]], mode="ar", beam_size=1)[0].text
    assert expected and len(expected.split()) <= 5
    assert out.out.splitlines() == [short[0][1], expected, short[1][1]]


def test_translate_bad_input_and_missing_checkpoint(synthetic_model, tmp_path, capsys, monkeypatch):
    ckpt = str(synthetic_model.checkpoint)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(synthetic_model.test_src[0].encode() + b"\nok \xff\xfe there\n")
    assert main(["translate", "--checkpoint", ckpt, "--input", str(bad), *AR_GREEDY]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("janus translate: error: ") and out.err.count("\n") == 1
    assert f"{bad}: line 2 is not valid UTF-8" in out.err

    _stdin(monkeypatch, bad.read_bytes())
    assert main(["translate", "--checkpoint", ckpt, *AR_GREEDY]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "<stdin>: line 2 is not valid UTF-8" in out.err

    missing = tmp_path / "no-such-checkpoint"
    inp = _write(tmp_path / "in.txt", synthetic_model.test_src[:2])
    out_file = tmp_path / "never.txt"
    assert main(["translate", "--checkpoint", str(missing), "--input", str(inp), "--output", str(out_file)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("janus translate: error: ") and out.err.count("\n") == 1
    assert str(missing) in out.err
    assert not out_file.exists()


def test_evaluate_every_mode(synthetic_model, tmp_path, capsys):
    raw = synthetic_model.raw
    report, prefix = tmp_path / "eval.json", tmp_path / "hyp"
    argv = ["evaluate", "--checkpoint", str(synthetic_model.checkpoint), "--src", str(raw / "test.src"),
            "--ref", str(raw / "test.tgt"), "--modes", "ar,nar,spec", "--iterations", "4", "--length-beam", "3",
            "--rerank", "--device", "cpu", "--output-json", str(report), "--hyp-prefix", str(prefix)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    for mode in ("ar", "nar", "spec"):  # each mode's wall time as soon as it is done
        timing = rf"^janus evaluate: {mode}: 100 sentences in [\d.]+ s \([\d.]+ sent/s, \d+ tok/s\)$"
        assert re.search(timing, err, re.M)
    assert re.match(r"janus evaluate: \d+ CPU threads? \(auto", err)
    lines = out.splitlines()
    assert lines[0].split() == ["mode", "settings", "BLEU", "chrF", "passes/sent", "seconds", "sent/s"]
    rows = {}
    for line in lines[1:4]:
        m = re.fullmatch(r"(\w+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        assert m, line
        rows[m.group(1)] = m.groups()[1:]
    assert list(rows) == ["ar", "nar", "spec"]
    assert (
        rows["ar"][0] == "beam 5" and rows["nar"][0] == "T=4 l=3 rerank" and rows["spec"][0] == "draft 1 exhausted k=4"
    )
    assert float(rows["ar"][1]) > 99 and float(rows["spec"][1]) > 99 and float(rows["nar"][1]) > 80
    assert all(0 < float(r[2]) <= 100 for r in rows.values())
    assert float(rows["nar"][3]) == 5.0  # T=4 passes + 1 rerank pass for every sentence
    assert re.search(r"^BLEU signature: nrefs:1\|.*version:2\.", out, re.M)
    assert re.search(r"^chrF signature: nrefs:1\|.*version:2\.", out, re.M)

    doc = json.loads(report.read_text())
    assert doc["sentences"] == 100 and Path(doc["checkpoint"]) == synthetic_model.checkpoint.resolve()
    assert set(doc["versions"]) >= {"torch", "sacrebleu"}
    assert list(doc["modes"]) == ["ar", "nar", "spec"]
    for mode, r in doc["modes"].items():
        assert r["sentences"] == 100
        assert set(r) >= {"settings", "bleu", "chrf", "bleu_signature", "chrf_signature", "mean_passes", "seconds",
                          "sentences_per_second"}  # fmt: skip
        assert r["settings"] == rows[mode][0] and f"{r['bleu']:.2f}" == rows[mode][1]
        assert r["seconds"] > 0 and r["sentences_per_second"] == r["sentences"] / r["seconds"]
        assert r["options"]["mode"] == mode and r["options"]["iterations"] == 4 and r["options"]["rerank"] is True
        assert r["bleu_signature"].startswith("nrefs:1|") and "chrF" not in r["bleu_signature"]
        assert len(read_lines(f"{prefix}.{mode}")[0]) == 100
    assert doc["modes"]["ar"]["bleu"] > 99
    assert read_lines(f"{prefix}.ar")[0] == synthetic_model.test_ref


def test_evaluate_bad_arguments(synthetic_model, tmp_path, capsys):
    raw = synthetic_model.raw
    short_ref = _write(tmp_path / "short.tgt", synthetic_model.test_ref[:90])
    base = ["evaluate", "--checkpoint", str(synthetic_model.checkpoint), "--src", str(raw / "test.src")]
    assert main([*base, "--ref", str(short_ref)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("janus evaluate: error: ") and err.count("\n") == 1
    assert f"{raw / 'test.src'} has 100 lines" in err and f"{short_ref} has 90" in err

    assert main([*base, "--ref", str(raw / "test.tgt"), "--modes", "ar,fast"]) == 2
    assert "--modes 'ar,fast'" in capsys.readouterr().err


def test_python_m_janus_translate_reads_stdin(synthetic_model):
    src = "\n".join(synthetic_model.test_src[:20]) + "\n"
    proc = subprocess.run(
        [sys.executable, "-m", "janus", "translate", "--checkpoint", str(synthetic_model.checkpoint), *AR_GREEDY],
        input=src.encode(),
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == synthetic_model.test_ref[:20]


def _big_input(synthetic_model, tmp_path: Path, n: int) -> Path:
    lines = [synthetic_model.test_src[i % 100] if i % 37 else "" for i in range(n)]
    return _write(tmp_path / "big.txt", lines)


def _janus(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "janus", *args], cwd=REPO, stderr=subprocess.PIPE, **kw)


def test_translate_streams_lines_while_it_runs(synthetic_model, tmp_path):
    n = 3000
    inp = _big_input(synthetic_model, tmp_path, n)
    ckpt = str(synthetic_model.checkpoint)
    opts = ["--window", "64", "--max-batch-size", "8", "--threads", "1"]
    # stderr to a file, and the rest of stdout through the same buffered reader: communicate() reads
    # the raw pipe and would lose whatever readline() had already buffered past the tenth line.
    with open(tmp_path / "stderr", "wb") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "janus", "translate", "--checkpoint", ckpt, "--input", str(inp),
                                 *AR_GREEDY, *opts], cwd=REPO, stdout=subprocess.PIPE, stderr=errors)  # fmt: skip
        try:
            first = [proc.stdout.readline() for _ in range(10)]
            running = proc.poll() is None  # ten lines read while the other 2990 are still being decoded
            rest = proc.stdout.read()
            proc.wait(timeout=600)
        finally:
            proc.kill()
            proc.stdout.close()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    assert running
    out = (b"".join(first) + rest).decode().splitlines()
    expected = [synthetic_model.test_ref[i % 100] if i % 37 else "" for i in range(n)]
    assert out == expected


def test_translate_resume_after_kill_gives_the_uninterrupted_file(synthetic_model, tmp_path, capsys):
    import os
    import signal
    import time

    n = 2000
    inp = _big_input(synthetic_model, tmp_path, n)
    ckpt = str(synthetic_model.checkpoint)
    opts = ["--window", "64", "--max-batch-size", "8", "--threads", "1", *AR_GREEDY]
    whole, part = tmp_path / "whole.txt", tmp_path / "part.txt"
    assert main(["translate", "--checkpoint", ckpt, "--input", str(inp), "--output", str(whole), *opts]) == 0
    assert whole.read_bytes().count(b"\n") == n

    proc = _janus("translate", "--checkpoint", ckpt, "--input", str(inp), "--output", str(part), *opts)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if part.exists() and part.read_bytes().count(b"\n") >= n // 4:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = part.read_bytes()
    lines_done = done.count(b"\n")
    assert n // 4 <= done.count(b"\n") < n, "the run ended before it could be killed midway"
    assert whole.read_bytes().startswith(done)
    with part.open("ab") as f:
        f.write("half a li".encode())  # what a kill in the middle of a write could leave
    argv = ["translate", "--checkpoint", ckpt, "--input", str(inp), "--output", str(part), "--resume", *opts]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "removing a partial last line (9 bytes)" in err
    assert f"{lines_done} of {n} lines done; continuing" in err
    assert part.read_bytes() == whole.read_bytes()

    assert main(argv) == 0  # resuming a finished file decodes nothing and changes nothing
    assert part.read_bytes() == whole.read_bytes()
    short = _write(tmp_path / "short.txt", synthetic_model.test_src[:3])
    assert main(["translate", "--checkpoint", ckpt, "--input", str(short), "--output", str(part), "--resume"]) == 2
    assert f"{part} has {n} lines but {short} only 3" in capsys.readouterr().err
    assert main(["translate", "--checkpoint", ckpt, "--input", str(short), "--resume"]) == 2
    assert "--resume needs --output FILE" in capsys.readouterr().err


def test_settings_column_names_the_options_that_change_a_mode():
    from janus.cli import _mode_settings
    from janus.config import DecodeConfig

    assert _mode_settings(DecodeConfig(mode="spec")) == "draft 1 exhausted k=4"
    position = DecodeConfig(mode="spec", draft_align="position", draft_iterations=3, draft_block=0)
    assert _mode_settings(position) == "draft 3 exhausted k=all position"
    relaxed = DecodeConfig(mode="spec", verify_top_beta=3, verify_tolerance=2.0, length_penalty=0.6)
    assert _mode_settings(relaxed) == "draft 1 exhausted k=4 relaxed top-3 tol 2 lp 0.6"
    assert _mode_settings(DecodeConfig(mode="nar", iterations=4, length_beam=1, dedup=True)) == "T=4 l=1 dedup"
    assert _mode_settings(DecodeConfig(mode="nar", length_weight=1.0, dedup=True)) == "T=10 l=3 lw 1 dedup"
