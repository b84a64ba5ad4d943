"""bench/gpu_check.sh --dry-run: the GPU check's code runs on CPU with tiny shapes, so the
script a GPU session runs cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    with open(os.path.join(tmp_path, "gpu_check.json")) as f:
        assert json.load(f) == result
    assert result["ok"] and result["dry_run"]
    assert result["engine_equality"]["float32"]["equal"]
    assert result["engine_equality"]["float32"]["tokens_per_step"] > 1.5  # drafts were accepted
    assert result["kv_profile"]["kv_blocks"] > 0 and result["kv_profile"]["planned_kv_blocks"] > 0
    assert set(result["figures"]["decode_tok_s"]) == {"1", "2"}
    assert set(result["figures"]["verify_ratio"]) == {"16", "32", "64"}
