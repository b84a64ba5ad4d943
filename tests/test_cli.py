"""python -m engine.generate: output, JSON line, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def generate(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_json_line_with_speculation():
    r = generate("--prompt", "What is the capital of France?", "--max-tokens", "12", "--json",
                 "--drafter", "eagle", "--draft", "random", "--tree-budget", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"]
    assert out["tokens"] >= 1 and out["tokens_per_s"] > 0 and out["mean_accepted"] >= 1.0


def test_bad_arguments_get_one_line_errors():
    for args in (["--prompt", "hi", "--max-tokens", "-3"], ["--prompt", "hi", "--temperature", "9"],
                 ["--prompt", "hi", "--max-tokens", "ten"], ["--prompt", "hi", "--model", "/nonexistent"],
                 ["--prompt", "hi", "--drafter", "eagle", "--draft", "/nonexistent"]):
        r = generate(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr[-500:])
