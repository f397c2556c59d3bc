"""load_tests/prompts.py's prompt files: one prompt per line, or JSON strings in `.jsonl`
(the speculation benchmark's code blocks span lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "load_tests"))
from prompts import prompts_from_file  # noqa: E402


def test_text_file_gives_one_prompt_per_line_cycled(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  second  \n")
    assert prompts_from_file(path, 5) == ["first", "second", "first", "second", "first"]


def test_jsonl_keeps_prompts_that_span_lines(tmp_path):
    block = "```python\ndef f():\n    return 1\n```\nRename f to g."
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(block) + "\n" + json.dumps("quote this") + "\n")
    assert prompts_from_file(path, 3) == [block, "quote this", block]


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompts_from_file(path, 1)
