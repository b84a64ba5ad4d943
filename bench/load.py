"""Load benchmark: latency and throughput of off / eagle / medusa / auto against the HTTP API.

For each load level (fixed concurrency, or Poisson arrivals at a rate) and each mode, it
streams chat completions (fixed prompts from bench/common.py, fixed ``max_tokens``,
``ignore_eos`` so every request produces exactly that many tokens, temperature 0) and
records time to first token, time per output token, end-to-end latency (P50/P99) and
output tokens/s. For ``auto`` it also polls ``/v1/speculation`` and records what the
router decided during the level (fraction of time speculating, mean tree budget).

Modes and the applications that serve them (started here on one Ray Serve instance,
loopback, a free port; only the ones the chosen modes need):

    eagle   app ``fixed-eagle``  (drafter=eagle,  router=false: speculates whenever asked)
    medusa  app ``fixed-medusa`` (drafter=medusa, router=false)
    auto    app ``auto``         (drafter=<--auto-drafter>, router=true: the router decides)
    off     the first of those apps (``"speculation": "off"`` per request)

A fixed mode needs router=false because with the router on a request's "eagle" only
selects among what the router allows. Modes run one after the other inside each level
(rotating their order between rounds), so background load hits them alike.

    .venv/bin/python bench/load.py                                   # the server's defaults: shipped drafters, auto on EAGLE
    .venv/bin/python bench/load.py --draft-path random --levels 1,2,4,8,16   # the machinery with untrained drafters
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --modes off,auto   # a running server

Bounded: every request has a timeout, every level a deadline. The last line printed is
one JSON summary; the full results go to --out (JSON) and --plot (PNG).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, flat_prompts  # noqa: E402

MODES = ("off", "eagle", "medusa", "auto")


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ---------------------------------------------------------------------------------------- one request


async def one_request(client, url: str, prompt: str, max_tokens: int, mode: str, timeout: float) -> dict:
    """Stream one chat completion; returns timings (perf_counter seconds) and the outcome."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "speculation": mode}
    t0 = time.perf_counter()
    rec = {"start": t0, "ttft": None, "end": None, "tokens": 0, "ok": False, "status": None, "error": None,
           "chunks": []}  # arrival time of each content chunk
    first = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                rec["status"] = resp.status_code
                if resp.status_code != 200:
                    rec["error"] = (await resp.aread()).decode(errors="replace")[:200]
                    rec["end"] = time.perf_counter()
                    return rec
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec["error"] = chunk["error"].get("message")
                        break
                    if chunk.get("usage"):
                        rec["tokens"] = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices") or []:
                        if (c.get("delta") or {}).get("content"):
                            rec["chunks"].append(time.perf_counter())
                            if first is None:
                                first = rec["chunks"][0]
                rec["ok"] = done and rec["error"] is None
    except TimeoutError:
        rec["error"] = f"timeout after {timeout:g}s"
    except Exception as exc:  # connection refused / reset: a failed request, not a crash of the bench
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["end"] = time.perf_counter()
    if first is not None:
        rec["ttft"] = first - t0
    return rec


# ---------------------------------------------------------------------------------------- one level


async def poll_router(client, url: str, stop: asyncio.Event, samples: list, every: float = 1.0) -> None:
    """Record (time, speculating, tree budget in force, decided budget) of the app's replicas."""
    while not stop.is_set():
        try:
            view = (await client.get(url + "/v1/speculation", timeout=5)).json()
            for rep in (view.get("replicas") or {}).values():
                d, load = rep.get("decision") or {}, rep.get("load") or {}
                samples.append({"t": time.perf_counter(), "speculate": bool(d.get("speculate")),
                                "decided_budget": d.get("tree_budget", 0), "budget_in_force": load.get("tree_budget", 0),
                                "batch": load.get("running", 0) + load.get("waiting", 0), "reason": d.get("reason")})
        except Exception:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def run_level(client, url: str, mode: str, kind: str, level: float, warmup: float, duration: float,
                    max_requests: int, max_tokens: int, timeout: float, seed: int, min_requests: int = 3,
                    stagger: float = 1.0) -> dict:
    """kind: "concurrency" (level workers back to back, started ``stagger`` seconds apart in
    all) or "rate" (Poisson arrivals, level req/s).

    The measured window starts after ``warmup`` and lasts ``duration`` seconds, extended (up to
    ``timeout``) until ``min_requests`` requests have completed in it; requests count when they
    *complete* inside the window, so a mode whose requests outlast the warm-up is still measured.
    """
    prompts = [p for _, p in flat_prompts()]
    rng = random.Random(seed)
    records: list[dict] = []
    router: list[dict] = []
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    window = {"end": t_measure + duration}
    hard_stop = window["end"] + timeout
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_router(client, url, stop, router)) if mode == "auto" else None
    counter = {"i": 0}

    def next_prompt() -> str:
        counter["i"] += 1
        return prompts[(seed + counter["i"]) % len(prompts)]

    def done_in_window() -> int:
        return sum(1 for r in records if t_measure <= r["end"] <= window["end"])

    def keep_going() -> bool:
        now = time.perf_counter()
        if now >= hard_stop or done_in_window() >= max_requests:
            return False
        if now < window["end"]:
            return True
        if done_in_window() < min_requests:  # too few completions yet: stretch the window
            window["end"] = now
            return True
        return False

    async def tracked(prompt: str) -> None:
        records.append(await one_request(client, url, prompt, max_tokens, mode, timeout))

    if kind == "concurrency":
        async def worker(i: int) -> None:
            # Clients do not start in the same instant: without a stagger, equal-length requests
            # run in lockstep waves (one batched prefill per wave), a phase that any one-off
            # delay breaks for good, so modes would be compared on their luck, not their speed.
            await asyncio.sleep(i * stagger / max(level, 1))
            while keep_going():
                await tracked(next_prompt())

        await asyncio.gather(*(worker(i) for i in range(int(level))))
    else:
        tasks = []
        t = time.perf_counter()
        while keep_going():
            t += rng.expovariate(level)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tracked(next_prompt())))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout + 5)
            for task in pending:
                task.cancel()
    if done_in_window() < min_requests:  # the last completions arrived while draining
        window["end"] = max([window["end"]] + [r["end"] for r in records])
    stop.set()
    if poller:
        await poller

    t_end = window["end"]
    rs = [r for r in records if t_measure <= r["end"] <= t_end]
    ok = [r for r in rs if r["ok"]]
    # Throughput counts the tokens streamed inside the window, by every request (also those that started
    # before it or end after it): counting whole requests that complete in it would quantise the figure
    # by the waves in which equal-length requests finish together. A request's tokens are spread evenly
    # over its content chunks (the usage chunk gives the exact total).
    tokens = 0.0
    for r in records:
        if r["ok"] and r["chunks"]:
            inside = sum(1 for t in r["chunks"] if t_measure <= t <= t_end)
            tokens += r["tokens"] * inside / len(r["chunks"])
    tpot = [(r["end"] - r["start"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["ttft"] and r["tokens"] > 1]
    e2e = [r["end"] - r["start"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    seen = [s for s in router if t_measure <= s["t"] <= t_end]
    out = {
        "mode": mode, "load_kind": kind, "level": level, "requests": len(rs), "ok": len(ok),
        "failed": len(rs) - len(ok), "errors": sorted({str(r["error"])[:120] for r in rs if not r["ok"]})[:5],
        "output_tokens": round(tokens, 1), "window_s": round(t_end - t_measure, 3),
        "output_tok_s": round(tokens / max(t_end - t_measure, 1e-9), 3),
        "requests_per_s": round(len(ok) / max(t_end - t_measure, 1e-9), 3),
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 99):
            v = percentile(xs, q)
            out[f"{name}_p{q}_s"] = None if v is None else round(v, 4)
    if mode == "auto":
        out["router"] = {
            "samples": len(seen),
            "speculating_frac": round(sum(s["speculate"] for s in seen) / len(seen), 3) if seen else None,
            "mean_decided_budget": round(sum(s["decided_budget"] for s in seen) / len(seen), 2) if seen else None,
            "mean_budget_in_force": round(sum(s["budget_in_force"] for s in seen) / len(seen), 2) if seen else None,
            "last_reason": seen[-1]["reason"] if seen else None,
        }
    return out


# ---------------------------------------------------------------------------------------- the served apps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_plan(modes: list[str], auto_drafter: str) -> dict[str, dict]:
    """App name -> its arguments (besides the common ones), for the modes wanted."""
    apps = {}
    if "eagle" in modes:
        apps["fixed-eagle"] = {"drafter": "eagle", "router": "false"}
    if "medusa" in modes:
        apps["fixed-medusa"] = {"drafter": "medusa", "router": "false"}
    if "auto" in modes or not apps:
        apps["auto"] = {"drafter": auto_drafter, "router": "true"}
    return apps


def mode_app(mode: str, apps: dict) -> str:
    if mode == "off":
        return next(iter(apps))
    return {"eagle": "fixed-eagle", "medusa": "fixed-medusa", "auto": "auto"}[mode]


class Served:
    """Ray + Serve on loopback with one application per entry of ``apps`` (route prefix /<name>)."""

    def __init__(self, apps: dict[str, dict], common: dict, startup_timeout: float = 300):
        import httpx
        import ray
        from ray import serve

        from app import app_builder

        self.ray, self.serve = ray, serve
        self.port = _free_port()
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=16, configure_logging=False, log_to_driver=False, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base = f"http://127.0.0.1:{self.port}"
        self.urls = {}
        for name, args in apps.items():
            serve.run(app_builder({**common, **args}), name=name, route_prefix=f"/{name}", blocking=False)
            self.urls[name] = f"{self.base}/{name}"
        deadline = time.time() + startup_timeout
        for name, url in self.urls.items():
            while True:
                try:
                    if httpx.get(url + "/health", timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"application {name} never became healthy")
                time.sleep(0.5)

    def close(self) -> None:
        try:
            self.serve.shutdown()
        finally:
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------- report


def compare(results: list[dict], levels: list[float]) -> list[dict]:
    """Per level: auto vs the best fixed mode (by throughput, and by P99 latency)."""
    rows = []
    for lv in levels:
        at = {r["mode"]: r for r in results if r["level"] == lv}
        fixed = {m: r for m, r in at.items() if m != "auto" and r["ok"]}
        row = {"level": lv, "best_fixed_tput_mode": None}
        if fixed:
            best_t = max(fixed.values(), key=lambda r: r["output_tok_s"])
            best_l = min(fixed.values(), key=lambda r: r["e2e_p99_s"] or math.inf)
            row.update(best_fixed_tput_mode=best_t["mode"], best_fixed_tput=best_t["output_tok_s"],
                       best_fixed_p99_mode=best_l["mode"], best_fixed_p99_s=best_l["e2e_p99_s"])
            spec = [m for m in ("eagle", "medusa") if m in fixed]
            if "off" in fixed and spec:
                best_spec = max(spec, key=lambda m: fixed[m]["output_tok_s"])
                row["speculation_speedup"] = round(fixed[best_spec]["output_tok_s"] / max(fixed["off"]["output_tok_s"],
                                                                                          1e-9), 3)
        if "auto" in at and fixed and at["auto"]["ok"]:
            a = at["auto"]
            row["auto_tput_ratio"] = round(a["output_tok_s"] / max(row["best_fixed_tput"], 1e-9), 3)
            row["auto_p99_ratio"] = round((a["e2e_p99_s"] or math.inf) / max(row["best_fixed_p99_s"], 1e-9), 3)
            row["auto_ok"] = row["auto_tput_ratio"] >= 0.95 and row["auto_p99_ratio"] <= 1.05
            row["auto_speculating_frac"] = (a.get("router") or {}).get("speculating_frac")
        rows.append(row)
    return rows


def crossover(rows: list[dict]) -> float | None:
    """The first level at which the best speculative mode stops beating off (speedup < 1)."""
    for r in rows:
        if r.get("speculation_speedup") is not None and r["speculation_speedup"] < 1.0:
            return r["level"]
    return None


def markdown(doc: dict) -> str:
    """The results as the tables of docs/benchmarks.md."""
    unit = "concurrency" if doc["load_kind"] == "concurrency" else "req/s"
    lines = [f"| {unit} | mode | output tok/s | TTFT P50 / P99 s | TPOT P50 / P99 s | E2E P50 / P99 s | ok / failed |",
             "|---|---|---|---|---|---|---|"]
    for lv in doc["levels"]:
        for m in MODES:
            r = next((x for x in doc["results"] if x["level"] == lv and x["mode"] == m), None)
            if r is None:
                continue
            extra = ""
            if m == "auto" and r.get("router"):
                extra = f" (speculating {r['router']['speculating_frac']}, budget {r['router']['mean_budget_in_force']})"
            lines.append(f"| {lv:g} | {m}{extra} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
                         f"{r['tpot_p50_s']} / {r['tpot_p99_s']} | {r['e2e_p50_s']} / {r['e2e_p99_s']} | "
                         f"{r['ok']} / {r['failed']} |")
    lines += ["", f"| {unit} | best fixed (tok/s) | auto / best tok/s | best fixed (P99) | auto / best P99 | "
                  "speculation speed-up | auto within 5% |", "|---|---|---|---|---|---|---|"]
    for row in doc["comparison"]:
        lines.append(f"| {row['level']:g} | {row.get('best_fixed_tput_mode')} | {row.get('auto_tput_ratio')} | "
                     f"{row.get('best_fixed_p99_mode')} | {row.get('auto_p99_ratio')} | "
                     f"{row.get('speculation_speedup')} | {row.get('auto_ok')} |")
    return "\n".join(lines)


def plot(results: list[dict], levels: list[float], kind: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    xlabel = "concurrent requests" if kind == "concurrency" else "arrival rate (req/s)"
    for m in modes:
        rs = sorted((r for r in results if r["mode"] == m), key=lambda r: r["level"])
        x = [r["level"] for r in rs]
        nan = float("nan")
        ax[0].plot(x, [r["e2e_p50_s"] or nan for r in rs], "o-", label=f"{m} P50")
        ax[0].plot(x, [r["e2e_p99_s"] or nan for r in rs], "x--", label=f"{m} P99", color=ax[0].lines[-1].get_color())
        ax[1].plot(x, [r["output_tok_s"] for r in rs], "o-", label=m)
    ax[0].set(title="end-to-end latency vs load", xlabel=xlabel, ylabel="seconds", xscale="log", yscale="log")
    ax[1].set(title="output throughput vs load", xlabel=xlabel, ylabel="tokens/s", xscale="log")
    auto = sorted((r for r in results if r["mode"] == "auto" and r.get("router")), key=lambda r: r["level"])
    if auto:
        x = [r["level"] for r in auto]
        ax[2].plot(x, [r["router"]["mean_budget_in_force"] or 0 for r in auto], "o-", label="tree budget in force")
        ax[2].plot(x, [r["router"]["mean_decided_budget"] or 0 for r in auto], "x--", label="tree budget decided")
        top = max([r["router"]["mean_budget_in_force"] or 0 for r in auto] +
                  [r["router"]["mean_decided_budget"] or 0 for r in auto] + [1])
        ax[2].set_ylim(-0.05 * top, 1.1 * top)
        twin = ax[2].twinx()
        twin.plot(x, [r["router"]["speculating_frac"] or 0 for r in auto], "s:", color="gray",
                  label="fraction of time speculating")
        twin.set(ylabel="fraction speculating", ylim=(-0.05, 1.05))
        twin.legend(loc="center right", fontsize=8)
    ax[2].set(title="auto: the router's choice vs load", xlabel=xlabel, ylabel="tree budget", xscale="log")
    for a, where in zip(ax, ("upper left", "upper left", "lower left")):
        a.legend(fontsize=7, loc=where)
        a.grid(alpha=0.3)
        a.set_xticks(levels, [f"{lv:g}" for lv in levels])  # the levels themselves, not 2 x 10^0
        a.xaxis.set_minor_locator(ticker.NullLocator())
    for fmt in (ax[0].yaxis.set_major_formatter, ax[0].yaxis.set_minor_formatter):
        fmt(ticker.FormatStrFormatter("%g"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


async def bench(args, urls: dict[str, str], apps: dict) -> list[dict]:
    import httpx

    from tqdm import tqdm

    results = []
    total = len(args.levels) * len(args.modes) * args.rounds
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        bar = tqdm(total=total, desc="load levels x modes", disable=args.quiet)
        for li, level in enumerate(args.levels):
            per_mode: dict[str, list[dict]] = {}
            for rnd in range(args.rounds):
                order = args.modes[rnd % len(args.modes):] + args.modes[:rnd % len(args.modes)]
                for mode in order:
                    url = urls[mode_app(mode, apps)] if apps else urls["url"]
                    r = await run_level(client, url, mode, args.load, level, args.warmup, args.duration,
                                        args.max_requests, args.max_tokens, args.request_timeout, seed=li * 97 + rnd,
                                        min_requests=args.min_requests, stagger=args.stagger)
                    per_mode.setdefault(mode, []).append(r)
                    bar.set_postfix_str(f"level {level:g} {mode}: {r['output_tok_s']:.1f} tok/s, "
                                        f"p99 {r['e2e_p99_s']}s, failed {r['failed']}")
                    bar.update(1)
            results += [merge_rounds(rs) for rs in per_mode.values()]
        bar.close()
    return results


def merge_rounds(rs: list[dict]) -> dict:
    """Several rounds of one (mode, level): the round with the median throughput, counts summed."""
    if len(rs) == 1:
        return rs[0]
    med = sorted(rs, key=lambda r: r["output_tok_s"])[len(rs) // 2]
    out = dict(med)
    out["rounds"] = [{k: r[k] for k in ("output_tok_s", "e2e_p99_s", "ttft_p50_s")} for r in rs]
    for k in ("requests", "ok", "failed"):
        out[k] = sum(r[k] for r in rs)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="off,eagle,medusa,auto")
    ap.add_argument("--load", choices=("concurrency", "rate"), default="concurrency",
                    help="concurrency: N clients back to back; rate: Poisson arrivals (open loop), N req/s")
    ap.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels or rates, comma separated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds per level before measuring (router settles)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per level and mode")
    ap.add_argument("--max-requests", type=int, default=200, help="measured requests per level and mode, at most")
    ap.add_argument("--min-requests", type=int, default=3,
                    help="stretch a level's window until this many requests completed in it")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each level, rotating the mode order")
    ap.add_argument("--stagger", type=float, default=1.0,
                    help="concurrency: seconds over which the clients start (0: all at once, in lockstep)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--url", default=None, help="bench a running server instead (all modes to this URL)")
    ap.add_argument("--draft-path", default="shipped",
                    help="'shipped' (assets/, what `make serve` loads), 'random' (untrained drafters), or a directory")
    ap.add_argument("--auto-drafter", default="eagle", choices=("eagle", "medusa"),
                    help="the drafter of the auto app (default: the server's, EAGLE)")
    ap.add_argument("--tree-budget", type=int, default=None,
                    help="largest draft tree (default: the server's for this machine, auto_tree_budget)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="the apps' dtype (auto: what `make serve` picks on this machine)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest concurrency level")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--report-interval", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="write the full results here (JSON)")
    ap.add_argument("--plot", default=None, help="plot latency, throughput and the tree budget here (PNG)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        args.levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--levels must be numbers, got {args.levels!r}")
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        ap.error(f"--modes must be among {', '.join(MODES)}, got {bad or 'nothing'}")
    if not args.levels or any(lv <= 0 for lv in args.levels):
        ap.error("--levels must be positive")
    if args.load == "concurrency" and any(lv != int(lv) for lv in args.levels):
        ap.error("concurrency levels must be whole numbers")
    if args.tree_budget is not None and args.tree_budget < 0:
        ap.error("--tree-budget must be >= 0")
    if args.max_tokens < 1 or args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        ap.error("--max-tokens, --duration and --rounds must be positive, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    served = None
    apps: dict = {}
    t0 = time.perf_counter()
    try:
        if args.url:
            urls = {"url": args.url.rstrip("/")}
        else:
            apps = app_plan(args.modes, args.auto_drafter)
            top = max(args.levels)
            common = {"max_num_seqs": str(args.max_num_seqs or max(1, int(math.ceil(top)))),
                      "max_waiting": "64", "max_model_len": "512", "kv_cache_gib": "0.25",
                      "torch_threads": str(args.torch_threads),
                      "dtype": args.dtype,
                      "report_interval_s": str(args.report_interval), "queue_timeout_s": str(args.request_timeout)}
            if args.draft_path != "shipped":
                common["draft_path"] = args.draft_path
            if args.tree_budget is not None:
                common["tree_budget"] = str(args.tree_budget)
            served = Served(apps, common)
            urls = served.urls
        results = asyncio.run(bench(args, urls, apps))
    finally:
        if served is not None:
            served.close()
    rows = compare(results, args.levels)
    cross = crossover(rows)
    auto_rows = [r for r in rows if "auto_ok" in r]
    from engine.config import auto_dtype, auto_tree_budget

    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    doc = {"bench": "load", "model": "default (SmolLM2-135M-Instruct)", "dtype": None if args.url else dtype,
           "load_kind": args.load, "levels": args.levels, "modes": args.modes, "max_tokens": args.max_tokens,
           "draft_path": args.draft_path,
           "tree_budget": args.tree_budget if args.tree_budget is not None or args.url else auto_tree_budget("cpu"),
           "warmup_s": args.warmup,
           "duration_s": args.duration, "rounds": args.rounds, "stagger_s": args.stagger, "apps": apps,
           "url": args.url,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.perf_counter() - t0, 1),
           "results": results, "comparison": rows, "crossover_level": cross}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(results, args.levels, args.load, args.plot)
    if not args.quiet:
        print(markdown(doc), flush=True)
    emit({"bench": "load", "levels": args.levels, "modes": args.modes,
          "failed": sum(r["failed"] for r in results),
          "auto_tput_ratio": [r.get("auto_tput_ratio") for r in rows],
          "auto_p99_ratio": [r.get("auto_p99_ratio") for r in rows],
          "auto_ok_all_levels": bool(auto_rows) and all(r["auto_ok"] for r in auto_rows),
          "crossover_level": cross, "json": args.out, "plot": args.plot, "wall_s": doc["wall_s"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
