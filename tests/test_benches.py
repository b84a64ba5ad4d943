"""The benches in bench/: tiny bounded runs print the documented final JSON line."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*argv) -> dict:
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_speculative_bench_shape(tmp_path):
    png = tmp_path / "spec.png"
    res = run_bench("bench/speculative.py", "--draft", "random", "--prompts", "2", "--max-tokens", "6",
                    "--tree-budget", "2,4", "--draft-int8", "both", "--lookup-also", "0", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["bench"] == "speculative" and res["prompts"] == 2
    assert set(res["by_budget"]) == {"2", "4"}
    for budget, modes in res["by_budget"].items():
        # --draft-int8 both, --lookup-also 0
        assert set(modes) == {"eagle", "medusa", "eagle_bf16", "medusa_bf16", "eagle_lookup0", "medusa_lookup0"}
        for kind in modes:
            m = modes[kind]
            # tau counts the bonus token: every verification commits at least one token,
            # and a tree of b nodes commits at most b + 1.
            assert 1.0 <= m["tau"] <= int(budget) + 1
            assert abs(m["speedup"] - m["tok_s"] / res["vanilla_tok_s"]) < 0.01
            assert m["draft_ms"] > 0 and m["verify_ms"] > 0
    # The headline figure is the drafter's best budget.
    best = res["eagle_best_budget"]
    assert res["eagle_speedup"] == max(res["by_budget"][b]["eagle"]["speedup"] for b in ("2", "4"))
    assert res["eagle_speedup"] == res["by_budget"][str(best)]["eagle"]["speedup"]


def test_decode_bench_shape():
    res = run_bench("bench/decode.py", "--prompts", "1", "--max-tokens", "4", "--no-hf", "--llama-cpp", "off")
    assert res["bench"] == "decode" and res["engine_tok_s"] > 0 and res["llama_cpp_tok_s"] is None
    # fraction_of_limit is tokens/s over bandwidth / weight bytes (SmolLM2-135M: ~270 MB in bf16).
    assert abs(res["fraction_of_limit"] - res["engine_tok_s"] / res["limit_tok_s"]) < 0.01
    assert 100 < res["weight_mb"] < 600


def test_draft_stop_bench_shape():
    res = run_bench("bench/draft_stop.py", "--prompts", "2", "--max-tokens", "12", "--min-probs", "0,0.6")
    assert res["bench"] == "draft_stop" and set(res["by_min_prob"]) == {"0.0", "0.6"}
    exact, stopped = res["by_min_prob"]["0.0"], res["by_min_prob"]["0.6"]
    # A higher threshold never drafts deeper: at most as many drafter forwards per step.
    assert stopped["drafter_forwards_per_step"] <= exact["drafter_forwards_per_step"]
    assert stopped["drafter_forwards_per_step"] >= 1  # a step's catch-up is a forward
    assert all(1.0 <= m["tau"] <= res["tree_budget"] + 1 for m in (exact, stopped))
    assert res["best"] in res["by_min_prob"]


def test_verify_rows_bench_shape():
    res = run_bench("bench/verify_rows.py", "--rows", "3", "--context", "40", "--repeats", "2")
    assert res["bench"] == "verify_rows" and set(res["ms"]) == {"1", "3"}
    assert res["ratio_to_one_row"]["1"] == 1.0 and all(ms > 0 for ms in res["ms"].values())
    assert abs(res["ratio_to_one_row"]["3"] - res["ms"]["3"] / res["ms"]["1"]) < 0.01


def test_prefill_bench_shape():
    res = run_bench("bench/prefill.py", "--lengths", "8,24", "--repeats", "1")
    assert res["bench"] == "prefill" and set(res["ratio"]) == {"8", "24"}
    assert {"engine", "hf"} <= set(res["ms"]) and all(ms > 0 for per in res["ms"].values() for ms in per.values())
    assert abs(res["ratio"]["24"] - res["ms"]["hf"]["24"] / res["ms"]["engine"]["24"]) < 0.01


def test_prefill_bench_rejects_bad_lengths():
    out = subprocess.run([sys.executable, "bench/prefill.py", "--lengths", "8,x"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode != 0 and "error: --lengths" in out.stderr and "Traceback" not in out.stderr


def test_feature_transport_bench_shape():
    res = run_bench("bench/feature_transport.py", "--batch", "2", "--tokens", "6", "--rounds", "1")
    assert res["bench"] == "feature_transport" and res["host_tok_s"] > 0 and res["shm_tok_s"] > 0
    assert res["shm_bytes_back_per_step"] < res["host_bytes_back_per_step"]  # the rows went straight to the drafter
