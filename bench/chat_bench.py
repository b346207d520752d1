"""The chat app under load: latency of streamed replies, 8 concurrent sessions, resident memory.

Starts the real app (lcrec_chat.ui.serve) on a run folder in a child process bound to 127.0.0.1, then talks to
it with gradio_client like a browser would:
  1. sequential: one session plays a scripted conversation (intention, pasted history, fused request, a
     refinement, "more like #n", a question) ``--rounds`` times; time to the first streamed update (the line
     saying what was understood) and to the full reply (cards), p50/p95 over every message;
  2. concurrent: ``--sessions`` clients (8) play the script at the same time; counts errors (exceptions, or a
     reply with no cards where cards were due) and times every reply under that load;
  3. resident memory (RSS) of the server process after loading, and its peak during the concurrent phase.
Prints a table and writes bench/results/chat.json. With ``--screenshot`` also drives chromium through one
conversation and saves assets/screenshot.png.

    .venv/bin/python bench/chat_bench.py --run-dir models/ml-100k [--config configs/ml-100k.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app_server import start_server, timed_reply  # noqa: E402  (bench/app_server.py)
from lcrec_chat.hardware import machine_record  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "chat.json"
# (message, whether a reply with cards is expected)
SCRIPT = [
    ("a funny 90s movie for a family night", True),
    ("I loved Toy Story, Aladdin and GoldenEye", True),
    ("I watched Fargo and Pulp Fiction, now I want something scary from the 80s", True),
    ("only comedies", True),
    ("more like the second one", True),
    ("what is #1?", False),
]




def rss_mb(proc: psutil.Process) -> float:
    procs = [proc] + proc.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20






def play(url: str, rounds: int, errors: list, timings: list) -> None:
    from gradio_client import Client
    client = Client(url, verbose=False)
    for _ in range(rounds):
        client.predict(api_name="/reset")
        for message, cards_due in SCRIPT:
            try:
                first, total, data = timed_reply(client, message)
            except Exception as e:   # any failure is counted, the run goes on
                errors.append(f"{message!r}: {type(e).__name__}: {e}")
                continue
            timings.append((message, first, total))
            if cards_due and not data.get("items"):
                errors.append(f"{message!r}: no cards ({data.get('text', '')[:200]})")


# ordinary /recommend requests (stateless API): a pasted history, a wish, both, a history with a filter
REQUESTS = [("", ["Toy Story", "Fargo"]), ("a funny 90s movie for a family night", []),
            ("I loved Pulp Fiction and Reservoir Dogs", []), ("something scary from the 80s", ["Alien"]),
            ("", ["Star Wars", "Raiders of the Lost Ark", "The Terminator"]), ("only comedies", ["Aladdin", "Babe"])]


def recommend_latency(url: str, methods: list[str], rounds: int) -> dict:
    """/recommend seconds per method (one warm-up request each, then every request `rounds` times)."""
    from gradio_client import Client
    client, out = Client(url, verbose=False), {}
    for method in methods:
        client.predict(*REQUESTS[0], 5, method, api_name="/recommend")   # loads the method, warms it up
        times, empty = [], 0
        for _ in range(rounds):
            for message, history in REQUESTS:
                start = time.perf_counter()
                data = client.predict(message, history, 5, method, api_name="/recommend")
                times.append(time.perf_counter() - start)
                empty += not data.get("items")
        out[method] = {"requests": len(times), "p50_s": pct(times, 0.5), "p95_s": pct(times, 0.95),
                       "without_items": empty}
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summarise(timings: list) -> dict:
    firsts, totals = [t[1] for t in timings], [t[2] for t in timings]
    cards = [t[2] for t in timings if dict(SCRIPT).get(t[0])]
    return {"replies": len(timings), "first_update_p50_s": pct(firsts, 0.5), "first_update_p95_s": pct(firsts, 0.95),
            "full_reply_p50_s": pct(totals, 0.5), "full_reply_p95_s": pct(totals, 0.95),
            "recommend_reply_mean_s": statistics.fmean(cards) if cards else float("nan")}


def screenshot(url: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1100, "height": 1500})
        page.goto(url)
        box = page.locator("#lcrec-input textarea")
        for message in ("I loved Toy Story, Aladdin and GoldenEye", "only comedies"):
            n = page.locator(".lcrec-reply").count()
            box.fill(message)
            box.press("Enter")
            page.wait_for_function(f"document.querySelectorAll('.lcrec-reply').length > {n} && "
                                   "!document.querySelector('.lcrec-pending')", timeout=300_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", help="preset; default: RUN_DIR/config.yaml, else configs/ml-100k.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--rounds", type=int, default=3, help="sequential plays of the script")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--concurrent-rounds", type=int, default=1)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--screenshot", action="store_true", help="also save assets/screenshot.png")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--methods", default="", help="comma-separated methods whose /recommend latency to time "
                    "(default: the app's default method; 'all' = every method the run folder serves)")
    ap.add_argument("--recommend-rounds", type=int, default=2, help="plays of the /recommend request list")
    args = ap.parse_args()
    config = args.config or (str(Path(args.run_dir) / "config.yaml") if (Path(args.run_dir) / "config.yaml").exists()
                             else "configs/ml-100k.yaml")

    t0 = time.perf_counter()
    proc, url = start_server(config, args.run_dir, args.overrides, args.startup_timeout)
    startup = time.perf_counter() - t0
    server = psutil.Process(proc.pid)
    try:
        from gradio_client import Client
        status = Client(url, verbose=False).predict("I loved Toy Story", [], 1, api_name="/recommend")
        if status["kind"] == "error":
            raise SystemExit(f"the app cannot recommend: {status['text']}")
        rss_loaded = rss_mb(server)
        from lcrec_chat.serving import available_methods
        served = available_methods(args.run_dir)
        methods = served if args.methods == "all" else [m for m in args.methods.split(",") if m] or [""]
        latency = recommend_latency(url, methods, args.recommend_rounds)
        rss_after_methods = rss_mb(server)

        seq_errors, seq = [], []
        play(url, args.rounds, seq_errors, seq)

        conc_errors, conc, peak = [], [], [rss_mb(server)]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                peak.append(rss_mb(server))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wall = time.perf_counter()
        with ThreadPoolExecutor(args.sessions) as pool:
            for f in [pool.submit(play, url, args.concurrent_rounds, conc_errors, conc) for _ in range(args.sessions)]:
                f.result()
        wall = time.perf_counter() - wall
        stop.set()
        sampler.join()
        if args.screenshot:
            screenshot(url, ROOT / "assets" / "screenshot.png")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    result = {
        "run_dir": args.run_dir, "config": config, "overrides": args.overrides,
        "machine": {**machine_record(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "startup_s": round(startup, 1), "rss_loaded_mb": round(rss_loaded), "rss_peak_mb": round(max(peak)),
        "recommend": latency, "rss_after_methods_mb": round(rss_after_methods), "methods_served": served,
        "sequential": {**summarise(seq), "errors": seq_errors},
        "concurrent": {"sessions": args.sessions, **summarise(conc), "wall_s": round(wall, 2),
                       "replies_per_s": round(len(conc) / wall, 2), "errors": conc_errors},
    }
    rows = [("startup (load model, first page)", f"{startup:.1f} s"),
            ("RSS after load / peak under load", f"{rss_loaded:.0f} / {max(peak):.0f} MB"),
            ("RSS with every timed method loaded", f"{rss_after_methods:.0f} MB")]
    for method, r in latency.items():
        rows.append((f"/recommend {method or 'default method'} p50 / p95 ({r['requests']} requests)",
                     f"{r['p50_s']:.2f} / {r['p95_s']:.2f} s"))
    for name in ("sequential", "concurrent"):
        r = result[name]
        rows += [(f"{name}: replies (errors)", f"{r['replies']} ({len(r['errors'])})"),
                 (f"{name}: first update p50 / p95", f"{r['first_update_p50_s']:.2f} / {r['first_update_p95_s']:.2f} s"),
                 (f"{name}: full reply p50 / p95", f"{r['full_reply_p50_s']:.2f} / {r['full_reply_p95_s']:.2f} s")]
    rows.append(("concurrent: throughput", f"{result['concurrent']['replies_per_s']} replies/s"))
    width = max(len(r[0]) for r in rows)
    print(f"chat app on {args.run_dir} ({args.sessions} concurrent sessions)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for err in (seq_errors + conc_errors)[:10]:
        print("  error:", err)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
