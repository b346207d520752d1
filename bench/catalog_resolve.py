"""How long title resolution and search take on the real MovieLens catalogues.

    python bench/catalog_resolve.py [--repeat 50]

Prints a table and writes bench/results/catalog_resolve.json. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.catalog import Catalog
from lcrec_chat.data.movielens import load_ml1m, load_ml100k
from lcrec_chat.hardware import machine_record  # noqa: E402

# 20 titles as a person would paste them: mixed case, moved articles, year hints, a typo, filler.
MESSAGE_20 = ("I loved Toy Story, GoldenEye and The Lion King (1994); also Aladin, Heat, Casino, "
              "the godfather, Star Wars, Fargo, Braveheart\n1. Apollo 13\n2. Pulp Fiction\n"
              "3. Shawshank Redemtion, The\n4. Good, the Bad and the Ugly, The\nJumanji, Twister, Titanic, "
              "Sabrina 1954, Mr. Holland's Opus and Babe too")
HUGE = ("Toy Story, " * 400 + "x" * 5000)[:10_000]
# worst case found so far: long filler-laden pieces that each need typo-tolerant scans (read up to 10k chars)
HOSTILE = ", ".join(f"i also really loved and watched the movie Unknown Film Number {i} too" for i in range(500))


def _time(fn, repeat: int) -> dict:
    """Wall and CPU milliseconds; CPU time is the steadier figure on a shared machine."""
    fn()  # warm up the interpreter and SQLite page cache
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - c) * 1000)
        wall.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(wall), 2), "max_ms": round(max(wall), 2),
            "median_cpu_ms": round(statistics.median(cpu), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, loader in (("ml-100k", load_ml100k), ("ml-1m", load_ml1m)):
            dataset = loader()
            t = time.perf_counter()
            Catalog.build(Path(tmp) / f"{name}.sqlite", dataset).close()
            build_s = time.perf_counter() - t
            t = time.perf_counter()
            cat = Catalog(Path(tmp) / f"{name}.sqlite")
            open_s = time.perf_counter() - t
            res = cat.resolve_titles(MESSAGE_20)
            rows.append({
                "catalogue": name, "items": len(cat), "build_s": round(build_s, 2), "open_s": round(open_s, 3),
                "matched_of_20": len(res.matches), "asked_back_of_20": len(res.ambiguous),
                "resolve_20_titles": _time(lambda: cat.resolve_titles(MESSAGE_20), args.repeat),
                "resolve_10k_chars": _time(lambda: cat.resolve_titles(HUGE), max(3, args.repeat // 10)),
                "resolve_hostile_10k_chars": _time(lambda: cat.resolve_titles(HOSTILE), max(3, args.repeat // 10)),
                "search": _time(lambda: cat.search("funny animated movie about toys"), args.repeat),
            })
            cat.close()
    print(f"{'catalogue':10} {'items':>6} {'build s':>8} {'open s':>7} {'matched+asked':>14} "
          f"{'20 titles ms (median/max/cpu)':>30} {'10k chars ms':>13} {'hostile ms':>11} {'search ms':>10}")
    for r in rows:
        print(f"{r['catalogue']:10} {r['items']:>6} {r['build_s']:>8} {r['open_s']:>7} "
              f"{r['matched_of_20']:>8}+{r['asked_back_of_20']}/20 "
              f"{r['resolve_20_titles']['median_ms']:>11} / {r['resolve_20_titles']['max_ms']:>6} / "
              f"{r['resolve_20_titles']['median_cpu_ms']:<6} "
              f"{r['resolve_10k_chars']['median_ms']:>13} {r['resolve_hostile_10k_chars']['median_ms']:>11} "
              f"{r['search']['median_ms']:>10}")
    out = Path(__file__).parent / "results" / "catalog_resolve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine_record(), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
