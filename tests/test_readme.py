"""The README runs as written: its Python snippet, against a small trained model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippet_runs(synthetic_model, tmp_path):
    (block,) = python_blocks(README.read_text(encoding="utf-8"))
    assert 'checkpoint = "ckpt/janus/averaged"' in block and "sentences = [" in block
    # Run from a folder where the README's relative path exists, exactly as written.
    target = tmp_path / "ckpt" / "janus" / "averaged"
    target.parent.mkdir(parents=True)
    target.symlink_to(synthetic_model.checkpoint, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    assert lines[1].startswith("Klicken Sie auf OK. -> ") and "passes)" in lines[1]
