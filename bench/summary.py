#!/usr/bin/env python3
"""Prints the Markdown tables of BENCHMARKS.md from a results.json written by bench/run.py.

    python3 bench/summary.py bench/results/results.json
"""

import json
import sys


def main(path):
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, {m['wrk']}, {m['date']}\n")
    s = res["scenarios"]
    rows = [name for name in ("tokenize", "detokenize", "metadata", "charge", "ivr_day") if name in s]
    if rows:
        print("| scenario (c=32, median of rounds) | bare req/s | vault req/s | ratio | vault p50 / p99 ms "
              "| vault CPU | bare CPU | non-2xx | socket errors |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in rows:
            r = s[name]
            print(f"| {name} | {r['bare_rps_median']:,.0f} | {r['vault_rps_median']:,.0f} | "
                  f"**{r['ratio_median']:.3f}×** | {r['vault_p50_ms_median']:.2f} / {r['vault_p99_ms_median']:.2f} | "
                  f"{r['vault_cores_median']:.2f} cores | {r['bare_cores_median']:.2f} cores | {r['non2xx']} | "
                  f"{r['socket_errors']} |")
        print()
        print("| round | scenario | bare req/s | vault req/s | ratio |")
        print("|---|---|---|---|---|")
        for name in rows:
            for i, rd in enumerate(s[name]["rounds"], 1):
                print(f"| {i} | {name} | {rd['bare']['rps']:,.0f} | {rd['vault']['rps']:,.0f} | {rd['ratio']:.3f} |")
        print()
    half = [(n, s[n]["half_peak"]) for n in ("tokenize", "detokenize") if n in s and "half_peak" in s[n]]
    if half:
        print("| paced at half the peak | served req/s | p50 ms | p99 ms | vault CPU |")
        print("|---|---|---|---|---|")
        for name, r in half:
            print(f"| {name} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | "
                  f"{r['server_cores']:.2f} cores |")
        print()
    if "sizes" in s:
        print("| stored tokens | tokenize req/s | p99 ms | detokenize req/s | p99 ms | bare req/s | disk | bytes/token "
              "| RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p in s["sizes"]:
            print(f"| {p['stored']:,} | {p['tokenize']['rps']:,.0f} | {p['tokenize']['p99_us'] / 1000:.2f} | "
                  f"{p['detokenize']['rps']:,.0f} | {p['detokenize']['p99_us'] / 1000:.2f} | {p['bare']['rps']:,.0f} | "
                  f"{p['disk_bytes'] / 1e6:,.0f} MB | {p['disk_bytes_per_token']:,.0f} | {p['rss_mb']:,.0f} MB |")
        print()
    if "rewrap" in s:
        r = s["rewrap"]
        d = r.get("tokenize_during", {})
        print(f"Rewrap while serving: {r['records']:,} records in {r['seconds']:.1f} s "
              f"(**{r['records_per_sec']:,.0f} records/s**); tokenize paced at half its peak: p99 "
              f"{r['tokenize_before']['p99_us'] / 1000:.2f} ms before, {d.get('p99_us', 0) / 1000:.2f} ms during "
              f"(non-2xx {d.get('status', 0)}).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json")
