"""bench/load.py: the JSON it writes has the documented shape (a tiny, bounded run on loopback)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_helpers():
    from bench.load import app_plan, compare, crossover, mode_app, percentile

    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2 and percentile(list(range(1, 101)), 99) == 99
    apps = app_plan(["off", "eagle", "medusa", "auto"], "eagle")
    assert set(apps) == {"fixed-eagle", "fixed-medusa", "auto"}
    assert apps["fixed-eagle"]["router"] == "false" and apps["auto"]["router"] == "true"
    assert mode_app("off", apps) == "fixed-eagle" and mode_app("medusa", apps) == "fixed-medusa"
    assert list(app_plan(["off"], "eagle")) == ["auto"]
    res = [{"mode": m, "level": lv, "ok": 5, "output_tok_s": t, "e2e_p99_s": p}
           for m, lv, t, p in [("off", 1, 10, 1.0), ("eagle", 1, 20, 0.5), ("auto", 1, 19.5, 0.52),
                               ("off", 8, 40, 2.0), ("eagle", 8, 30, 3.0), ("auto", 8, 35, 2.2)]]
    rows = compare(res, [1, 8])
    assert rows[0]["best_fixed_tput_mode"] == "eagle" and rows[0]["auto_ok"]
    assert rows[1]["best_fixed_tput_mode"] == "off" and not rows[1]["auto_ok"]
    assert rows[0]["speculation_speedup"] == 2.0 and crossover(rows) == 8


@pytest.mark.parametrize("argv", [["--modes", "fast"], ["--levels", "0"], ["--levels", "1.5"], ["--max-tokens", "0"],
                                  ["--tree-budget", "-1"]])
def test_bad_args(argv):
    out = subprocess.run([sys.executable, "bench/load.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(300)
def test_tiny_run_json_shape(tmp_path):
    out_json, out_png = tmp_path / "load.json", tmp_path / "load.png"
    proc = subprocess.run(
        [sys.executable, "bench/load.py", "--modes", "off,auto", "--load", "rate", "--levels", "1,2",
         "--warmup", "0.5", "--duration", "2", "--max-tokens", "3", "--max-requests", "6", "--quiet",
         "--out", str(out_json), "--plot", str(out_png)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "load" and last["failed"] == 0 and len(last["auto_tput_ratio"]) == 2
    assert out_png.stat().st_size > 10_000
    doc = json.loads(out_json.read_text())
    for key in ("levels", "modes", "results", "comparison", "crossover_level", "apps", "max_tokens"):
        assert key in doc
    assert {(r["mode"], r["level"]) for r in doc["results"]} == {(m, lv) for m in ("off", "auto") for lv in (1, 2)}
    for r in doc["results"]:
        assert r["failed"] == 0 and r["ok"] >= 1 and r["output_tok_s"] > 0
        for k in ("ttft", "tpot", "e2e"):
            assert r[f"{k}_p50_s"] is not None and r[f"{k}_p50_s"] <= r[f"{k}_p99_s"]
        if r["mode"] == "auto":
            assert r["router"]["samples"] >= 1 and 0 <= r["router"]["speculating_frac"] <= 1
    assert [row["level"] for row in doc["comparison"]] == [1, 2]
    assert all("auto_tput_ratio" in row and "auto_p99_ratio" in row for row in doc["comparison"])
