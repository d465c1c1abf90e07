"""The janus command line as a whole: help texts."""

from __future__ import annotations

import re

import pytest

from janus.cli import main


@pytest.mark.parametrize("command", ["prepare", "train", "average", "translate", "evaluate"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)  # argparse wraps long help lines
    flags = re.findall(r"(--[a-z0-9-]+)[^-]*?\(default: ", text)
    assert flags, text[:500]
    for entry in re.split(r" (?=--[a-z])", text):
        assert entry.count("(default:") <= 1, entry
    if command == "prepare":
        assert "--vocab-size INT size of the joint sentencepiece vocabulary" in text and "(default: 8000)" in text
