"""The repository speaks of the product, not of the history of the work (that is git log).

Every tracked text file is scanned for diary markers: numbered work sessions, lettered
runs ("run" followed by a capital A-H) and notes of variants tried and discarded. A figure that a
default rests on belongs in the benchmark tables (docs/benchmarks.md) with the rule it
supports, not in a narrative of who measured what when.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_SUFFIXES = (".png", ".safetensors")

# Built by concatenation so that this file's own source does not match.
_SESSION = "sess" + "ions? [0-9]"
_DROPPED = "tried and " + "dropped"
CASELESS = re.compile(f"{_SESSION}|{_DROPPED}", re.IGNORECASE)
# A lettered run: "run" in any case, then one capital letter A-H standing alone. The letter is
# matched case-sensitively, so English such as "run a benchmark" does not count.
LETTERED_RUN = re.compile(r"\b(?i:r" + r"un) [A-H]\b")


def tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout: {exc}")
    return [p for p in out.decode().split("\0") if p and not p.endswith(SKIP_SUFFIXES)]


def diary_lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if CASELESS.search(line) or LETTERED_RUN.search(line)]


def test_the_patterns_tell_diary_markers_from_english():
    hits = ["as in sess" + "ion 12", "Sess" + "ions 2-6 saw", "the r" + "un H figures", "R" + "un B (warm)",
            "an idea we tri" + "ed and dropped"]
    misses = ["run a benchmark", "to run a batch to completion", "has not run a step yet", "a session fixture",
              "scope='session'", "run Alpha", "rerun B", "run Hi"]
    assert all(diary_lines(s) for s in hits), [s for s in hits if not diary_lines(s)]
    assert not any(diary_lines(s) for s in misses), [s for s in misses if diary_lines(s)]


def test_no_diary_markers_in_tracked_files():
    found = []
    for rel in tracked_text_files():
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):  # deleted in the working tree, or a submodule
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:  # binary
            continue
        found += [f"{rel}:{n}: {line[:160]}" for n, line in diary_lines(text)]
    assert not found, ("history narrated in tracked files (state the rule and point to the "
                       "benchmark table instead):\n" + "\n".join(found))
