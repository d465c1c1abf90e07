"""python -m janus.info: the report runs, lists every op backend, and survives missing pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from janus import info

REPO = Path(__file__).resolve().parents[1]


def run_info(*args: str, env: dict[str, str] | None = None, prelude: str = "") -> str:
    """stdout of ``python -m janus.info`` in a fresh process (``prelude`` runs first)."""
    code = f"{prelude}\nimport sys\nfrom janus.info import main\nsys.exit(main({list(args)!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_module_runs_and_lists_pad_batch_backends():
    proc = subprocess.run([sys.executable, "-m", "janus.info"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("torch: ", "triton: ", "xformers: ", "cpu threads: ", "op pad_batch:", "    reference: available"):
        assert line in out, out
    assert "    cpp: " in out, out


def test_json_output_matches_collect_keys():
    data = json.loads(run_info("--json"))
    assert set(data) == set(info.collect())
    backends = [b["backend"] for b in data["ops"]["pad_batch"]]
    assert backends == ["cpp", "reference"]


def test_collect_is_json_serialisable():
    data = info.collect()
    assert json.loads(json.dumps(data)) == data
    assert data["ops_error"] == ""
    assert data["versions"]["janus"]


def test_report_without_triton():
    # sys.modules[name] = None makes every import of triton fail, as if it were not installed.
    out = run_info(prelude="import sys; sys.modules['triton'] = None")
    assert "op pad_batch:" in out


def test_report_when_extension_disabled_without_prebuilt():
    # Hide a prebuilt janus._C and forbid the build: cpp must be reported unavailable, with the reason.
    prelude = "import sys; sys.modules['janus._C'] = None"
    out = run_info(env={"JANUS_BUILD_EXT": "0"}, prelude=prelude)
    assert "cpp: unavailable: JANUS_BUILD_EXT=0" in out, out
    assert "reference: available" in out
