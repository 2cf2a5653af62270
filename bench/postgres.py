#!/usr/bin/env python3
"""PostgreSQL scale-out benchmark (issue #10).

Tokenize and detokenize through the sled vault, one vault replica over
PostgreSQL and two replicas over the same database, each round next to the
bare actix-web handler (examples/bare.rs) in the same run, driven by wrk with
the same Lua scripts as bench/run.py. With two replicas the connections are
split between them (one wrk per replica, run at once) and the rates add up.

    cargo build --release --bins --example bare
    python3 bench/postgres.py [--pg postgres://postgres@127.0.0.1:5432/postgres] [--rounds 3] [--duration 10]

Reports per setup: req/s, the ratio to the bare handler's round, p50/p99
(the worst replica's), the vault processes' CPU and PostgreSQL's (all its
backends, from /proc), and non-2xx and socket errors.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (the shared harness: Server, wrk, free_port, fmt)


def psql(admin, sql):
    subprocess.run(["psql", admin, "-qAtc", sql], check=True, capture_output=True)


def postgres_ticks():
    """CPU ticks of every PostgreSQL process (the server's share of the work)."""
    total = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.find("(") + 1:raw.rfind(")")]
        if name.startswith("postgres"):
            fields = raw.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


class Setup:
    """One, or several, vaults sharing a data directory and a store."""

    def __init__(self, tmp, psp_url, store, replicas):
        self.data = os.path.join(tmp, f"data-{time.time_ns()}")
        self.servers = []
        for _ in range(replicas):
            port = R.free_port()
            argv = [R.VAULT, "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{port}", "--psp-url", psp_url]
            if store:
                argv += ["--store", store]
            self.servers.append((R.Server(argv, f"http://127.0.0.1:{port}/readyz", env={"RUST_LOG": "warn"}),
                                 f"http://127.0.0.1:{port}"))
        self.jwt = {role: subprocess.run([R.VAULT, "dev", "token", "--role", role, "--ttl", "8h",
                                          "--data-dir", self.data], capture_output=True, text=True,
                                         check=True).stdout.strip() for role in ("edge", "psp")}

    def stop(self):
        for s, _ in self.servers:
            s.stop()

    def tokens(self, tmp, seconds=3):
        """Tokenizes for a few seconds through the first replica; returns a file of tokens."""
        prefix = os.path.join(tmp, f"tokens-{time.time_ns()}")
        env = {**os.environ, "TV_JWT": self.jwt["edge"], "TV_KEEP": "1", "TV_OUT": prefix}
        subprocess.run(["wrk", "-t", "2", "-c", "16", "-d", f"{seconds}s", "-s", "bench/fill.lua",
                        self.servers[0][1]], cwd=R.ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
        tokens = []
        for path in glob.glob(prefix + ".*"):
            with open(path) as f:
                tokens += [line.strip() for line in f if len(line.strip()) >= 12]
        out = os.path.join(tmp, "tokens.txt")
        with open(out, "w") as f:
            f.write("\n".join(tokens[:20000]) + "\n")
        return out, len(tokens)

    def load(self, script, env, args):
        """wrk against every replica at once (connections split); the combined result."""
        n = len(self.servers)
        per = argparse.Namespace(**{**vars(args), "connections": max(1, args.connections // n),
                                    "threads": max(1, args.threads // n)})
        results = [None] * n
        pg_before = postgres_ticks()
        t0 = time.time()

        def one(i):
            server, url = self.servers[i]
            results[i] = R.wrk(script, url, server.pid, env, per)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        return {
            "rps": sum(r["rps"] for r in results),
            "p50_us": max(r["p50_us"] for r in results),
            "p99_us": max(r["p99_us"] for r in results),
            "server_cores": sum(r["server_cores"] for r in results),
            "postgres_cores": (postgres_ticks() - pg_before) / R.TICK / wall,
            "client_cores": sum(r["client_cores"] for r in results),
            "non2xx": sum(r["non2xx"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "by_status": {},
        }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg", default=os.environ.get("TOKENVAULT_TEST_PG", "postgres://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", default=os.path.join(R.ROOT, "bench", "results", "postgres.json"))
    p.add_argument("--bin-dir", default=os.path.join(R.ROOT, "target", "release"))
    args = p.parse_args()
    R.VAULT = os.path.join(args.bin_dir, "tokenvault")
    R.MOCK_PSP = os.path.join(args.bin_dir, "tokenvault-mock-psp")
    R.BARE = os.path.join(args.bin_dir, "examples", "bare")
    for binary in (R.VAULT, R.MOCK_PSP, R.BARE):
        if not os.path.exists(binary):
            raise SystemExit(f"missing {binary}: run `cargo build --release --bins --example bare` first")
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    tmp = tempfile.mkdtemp(prefix="tokenvault-pgbench-")
    bare_port, psp_port = R.free_port(), R.free_port()
    bare = R.Server([R.BARE, f"127.0.0.1:{bare_port}"], f"http://127.0.0.1:{bare_port}/")
    psp = R.Server([R.MOCK_PSP, "--listen", f"127.0.0.1:{psp_port}"], f"http://127.0.0.1:{psp_port}/")
    base = args.pg.rsplit("/", 1)[0]
    results = {"machine": R.machine(), "args": vars(args), "setups": {}}
    try:
        for name, replicas in (("sled", 1), ("postgres x1", 1), ("postgres x2", 2)):
            store = None
            if name.startswith("postgres"):
                psql(args.pg, "DROP DATABASE IF EXISTS tokenvault_bench")
                psql(args.pg, "CREATE DATABASE tokenvault_bench")
                store = f"{base}/tokenvault_bench?sslmode=disable"
            setup = Setup(tmp, f"http://127.0.0.1:{psp_port}", store, replicas)
            tokens, n = setup.tokens(tmp)
            print(f"== {name}: {n} cards stored to detokenize", flush=True)
            out = {}
            for scenario, env in (("tokenize", {"TV_JWT": setup.jwt["edge"]}),
                                  ("detokenize", {"TV_JWT": setup.jwt["psp"], "TV_TOKENS": tokens})):
                rounds = []
                for i in range(args.rounds):
                    b = R.wrk("tokenize.lua", f"http://127.0.0.1:{bare_port}", bare.pid, {"TV_JWT": "x"}, args)
                    v = setup.load(f"{scenario}.lua", env, args)
                    ratio = v["rps"] / b["rps"]
                    print(f"  {scenario} round {i + 1}  bare  {R.fmt(b)}", flush=True)
                    print(f"  {scenario} round {i + 1}  vault {R.fmt(v)}  postgres cpu {v['postgres_cores']:.2f}"
                          f"   ratio {ratio:.3f}", flush=True)
                    rounds.append({"bare": b, "vault": v, "ratio": ratio})
                out[scenario] = {
                    "rounds": rounds,
                    "ratio_median": statistics.median(r["ratio"] for r in rounds),
                    "vault_rps_median": statistics.median(r["vault"]["rps"] for r in rounds),
                    "p99_ms_median": statistics.median(r["vault"]["p99_us"] for r in rounds) / 1000,
                    "vault_cores_median": statistics.median(r["vault"]["server_cores"] for r in rounds),
                    "postgres_cores_median": statistics.median(r["vault"]["postgres_cores"] for r in rounds),
                }
            setup.stop()
            results["setups"][name] = out
    finally:
        bare.stop()
        psp.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\n| setup | scenario | req/s | ratio to bare | p99 ms | vault cores | PostgreSQL cores |")
    print("|---|---|---|---|---|---|---|")
    for name, out in results["setups"].items():
        for scenario, s in out.items():
            print(f"| {name} | {scenario} | {s['vault_rps_median']:.0f} | {s['ratio_median']:.3f} | "
                  f"{s['p99_ms_median']:.1f} | {s['vault_cores_median']:.2f} | {s['postgres_cores_median']:.2f} |")


if __name__ == "__main__":
    main()
