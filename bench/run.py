#!/usr/bin/env python3
"""The tokenvault benchmark: the real release binary under an external load
generator (wrk), against a bare actix-web JSON handler (examples/bare.rs, same
profile) measured in the same run, round by round.

    cargo build --release --bins --example bare
    python3 bench/run.py                      # every scenario (about 20 minutes)
    python3 bench/run.py --scenarios tokenize,detokenize --rounds 3 --duration 10

Prints, per round, requests/s of each side, their ratio, p50/p99 and the CPU each
server process used (cores, from /proc/<pid>/stat) and the client's; writes
bench/results/results.json and the SVG plots BENCHMARKS.md shows. Standard
library only (no pip install).
"""

import argparse
import glob
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAULT = MOCK_PSP = BARE = None  # set from --bin-dir
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def du_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Server:
    def __init__(self, argv, health, env=None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        wait_up(health)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wrk(script, url, pid, env, args):
    """One wrk run; returns its summary with the server's and the client's CPU."""
    env = {**os.environ, **env, "TV_CONNECTIONS": str(args.connections), "TV_THREADS": str(args.threads)}
    before_srv = cpu_ticks(pid)
    before_cli = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(
        ["wrk", "-t", str(min(args.threads, int(env.get("TV_C", args.connections)))),
         "-c", str(env.get("TV_C", args.connections)),
         "-d", f"{env.get('TV_D', args.duration)}s", "--timeout", "5s", "-s", os.path.join("bench", script), url],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.time() - t0
    after_cli = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(l for l in out.splitlines() if l.startswith("BENCH "))
    r = json.loads(line[6:])
    secs = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / secs
    r["server_cores"] = (cpu_ticks(pid) - before_srv) / TICK / wall
    r["client_cores"] = ((after_cli.ru_utime - before_cli.ru_utime) + (after_cli.ru_stime - before_cli.ru_stime)) / wall
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["non2xx"] = r["status"]
    return r


def fmt(r):
    return (f"{r['rps']:>9.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  p99 {r['p99_us'] / 1000:6.2f} ms  "
            f"cpu {r['server_cores']:.2f} cores (client {r['client_cores']:.2f})  "
            f"non-2xx {r['non2xx']}{' ' + json.dumps(r['by_status']) if r.get('by_status') else ''} "
            f"socket errors {r['errors']}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="tokenvault-bench-")
        self.results = {"machine": machine(), "args": vars(args), "scenarios": {}}
        self.bare_port = free_port()
        self.bare = Server([BARE, f"127.0.0.1:{self.bare_port}"], f"http://127.0.0.1:{self.bare_port}/")
        self.bare_url = f"http://127.0.0.1:{self.bare_port}"
        self.psp_port = free_port()
        self.psp = Server([MOCK_PSP, "--listen", f"127.0.0.1:{self.psp_port}"],
                          f"http://127.0.0.1:{self.psp_port}/")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vault = self.start_vault()
        self.jwt = {role: self.token(role) for role in ("edge", "crm", "psp", "officer")}

    def start_vault(self):
        return Server([VAULT, "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
                       "--psp-url", f"http://127.0.0.1:{self.psp_port}"],
                      f"http://127.0.0.1:{self.port}/readyz", env={"RUST_LOG": "warn"})

    def fresh(self):
        """A new vault on an empty data directory (the store-size scenario starts from zero)."""
        self.vault.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vault = self.start_vault()
        self.jwt = {role: self.token(role) for role in ("edge", "crm", "psp", "officer")}

    def token(self, role):
        return subprocess.run([VAULT, "dev", "token", "--role", role, "--ttl", "8h", "--data-dir", self.data],
                              capture_output=True, text=True, check=True).stdout.strip()

    def close(self):
        for s in (self.vault, self.bare, self.psp):
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stored(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("tokenvault_tokens_stored "):
                    return int(float(line.split()[1]))
        raise SystemExit("tokenvault_tokens_stored missing from /metrics")

    def fill(self, count, keep=50):
        """Tokenizes until the vault holds `count` more cards; returns every `keep`-th token."""
        prefix = os.path.join(self.tmp, f"tokens-{time.time_ns()}")
        target = self.stored() + count
        env = {**os.environ, "TV_JWT": self.jwt["edge"], "TV_KEEP": str(keep), "TV_OUT": prefix}
        t0 = time.time()
        load = subprocess.Popen(["wrk", "-t", str(self.args.threads), "-c", str(self.args.connections),
                                 "-d", "36000s", "--timeout", "5s", "-s", "bench/fill.lua", self.url],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        while self.stored() < target:
            if load.poll() is not None:
                raise SystemExit("wrk stopped while filling the vault")
            time.sleep(0.2)
        load.send_signal(signal.SIGINT)
        load.wait()
        tokens = []
        for path in glob.glob(prefix + ".*"):
            with open(path) as f:
                tokens += [l.strip() for l in f if len(l.strip()) >= 12]
        secs = time.time() - t0
        print(f"  filled {count} cards in {secs:.1f} s ({count / secs:.0f}/s); vault holds {self.stored()}",
              flush=True)
        return tokens

    def tokens_file(self, tokens):
        path = os.path.join(self.tmp, "tokens.txt")
        with open(path, "w") as f:
            f.write("\n".join(tokens) + "\n")
        return path

    def env_for(self, scenario, tokens_path):
        return {
            "tokenize": {"TV_JWT": self.jwt["edge"]},
            "detokenize": {"TV_JWT": self.jwt["psp"], "TV_TOKENS": tokens_path},
            "metadata": {"TV_JWT": self.jwt["crm"], "TV_TOKENS": tokens_path},
            "charge": {"TV_JWT": self.jwt["psp"], "TV_TOKENS": tokens_path},
            "ivr_day": {"TV_JWT_EDGE": self.jwt["edge"], "TV_JWT_CRM": self.jwt["crm"],
                        "TV_JWT_PSP": self.jwt["psp"], "TV_TOKENS": tokens_path},
        }[scenario]

    def bare_round(self, extra=None):
        return wrk("tokenize.lua", self.bare_url, self.bare.pid, {"TV_JWT": "x", **(extra or {})}, self.args)

    def versus(self, scenario, tokens_path, rounds):
        """Alternates bare and vault rounds; returns the rounds and their medians."""
        out = []
        for i in range(rounds):
            b = self.bare_round()
            v = wrk(f"{scenario}.lua", self.url, self.vault.pid, self.env_for(scenario, tokens_path), self.args)
            ratio = v["rps"] / b["rps"]
            print(f"  round {i + 1}  bare  {fmt(b)}", flush=True)
            print(f"  round {i + 1}  vault {fmt(v)}   ratio {ratio:.3f}", flush=True)
            out.append({"bare": b, "vault": v, "ratio": ratio})
        summary = {
            "ratio_median": statistics.median(r["ratio"] for r in out),
            "vault_rps_median": statistics.median(r["vault"]["rps"] for r in out),
            "bare_rps_median": statistics.median(r["bare"]["rps"] for r in out),
            "vault_p99_ms_median": statistics.median(r["vault"]["p99_us"] for r in out) / 1000,
            "vault_p50_ms_median": statistics.median(r["vault"]["p50_us"] for r in out) / 1000,
            "vault_cores_median": statistics.median(r["vault"]["server_cores"] for r in out),
            "bare_cores_median": statistics.median(r["bare"]["server_cores"] for r in out),
            "non2xx": sum(r["vault"]["non2xx"] for r in out),
            "socket_errors": sum(r["vault"]["errors"] + r["bare"]["errors"] for r in out),
        }
        print(f"  => {scenario}: ratio {summary['ratio_median']:.3f} (median of {rounds}), "
              f"vault {summary['vault_rps_median']:.0f} req/s vs bare {summary['bare_rps_median']:.0f}, "
              f"p99 {summary['vault_p99_ms_median']:.2f} ms", flush=True)
        return {"rounds": out, **summary}

    def at_rate(self, scenario, tokens_path, rate):
        """The vault paced at `rate` req/s (closed loop with per-connection delays)."""
        env = {**self.env_for(scenario, tokens_path), "TV_RATE": str(rate)}
        r = wrk(f"{scenario}.lua", self.url, self.vault.pid, env, self.args)
        print(f"  {scenario} paced at {rate:.0f}/s: {fmt(r)}", flush=True)
        return r

    def stats(self):
        return {"rss_mb": rss_mb(self.vault.pid), "disk_bytes": du_bytes(os.path.join(self.data, "sled"))}


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release,
            "wrk": wrk_v[0] if wrk_v else "?", "date": time.strftime("%Y-%m-%d")}


def run(args):
    b = Bench(args)
    res = b.results["scenarios"]
    try:
        wanted = args.scenarios.split(",")
        print(f"machine: {b.results['machine']}", flush=True)
        tokens = b.fill(args.seed_tokens, keep=1)
        tpath = b.tokens_file(tokens)
        for scenario in ("tokenize", "detokenize", "metadata", "charge", "ivr_day"):
            if scenario in wanted:
                print(f"{scenario}:", flush=True)
                res[scenario] = b.versus(scenario, tpath, args.rounds)
                if scenario in ("tokenize", "detokenize"):
                    half = res[scenario]["vault_rps_median"] / 2
                    res[scenario]["half_peak"] = b.at_rate(scenario, tpath, half)
        if "concurrency" in wanted:
            print("concurrency sweep:", flush=True)
            sweep = {}
            for scenario in ("tokenize", "detokenize"):
                sweep[scenario] = []
                for c in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                    env = {**b.env_for(scenario, tpath), "TV_C": str(c), "TV_D": str(max(5, args.duration // 2))}
                    r = wrk(f"{scenario}.lua", b.url, b.vault.pid, env, args)
                    print(f"  {scenario} c={c:<4} {fmt(r)}", flush=True)
                    sweep[scenario].append({"connections": c, **r})
            res["concurrency"] = sweep
        if "sizes" in wanted or "rewrap" in wanted:
            print("store sizes (a fresh vault):", flush=True)
            b.fresh()
            sizes = []
            sample = []
            for size in [int(s) for s in args.sizes.split(",")]:
                have = b.stored()
                if size > have:
                    sample += b.fill(size - have, keep=max(1, (size - have) // 20000))
                tp = b.tokens_file(sample)
                point = {"stored": b.stored(), **b.stats()}
                for scenario in ("tokenize", "detokenize"):
                    r = wrk(f"{scenario}.lua", b.url, b.vault.pid, b.env_for(scenario, tp), args)
                    print(f"  {point['stored']:>8} stored  {scenario:<10} {fmt(r)}", flush=True)
                    point[scenario] = r
                point["bare"] = b.bare_round()
                point["disk_bytes_per_token"] = point["disk_bytes"] / point["stored"]
                print(f"  {point['stored']:>8} stored  disk {point['disk_bytes'] / 1e6:.0f} MB "
                      f"({point['disk_bytes_per_token']:.0f} B/token), RSS {point['rss_mb']:.0f} MB; "
                      f"bare {point['bare']['rps']:.0f} req/s", flush=True)
                sizes.append(point)
            res["sizes"] = sizes
            tpath = b.tokens_file(sample)
        if "rewrap" in wanted:
            res["rewrap"] = rewrap(b, tpath)
    finally:
        b.close()
        # Whatever was measured is kept, even when a later scenario fails.
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(b.results, f, indent=1)
        import plots
        plots.draw(b.results, args.out)
        print(f"wrote {args.out}/results.json and plots", flush=True)


def admin(b, method, path, body=None):
    req = urllib.request.Request(b.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": "Bearer " + b.jwt["officer"],
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read() or b"{}")


def rewrap(b, tpath):
    """Tokenize p99 (paced at half its peak) without and during an online rewrap."""
    print("rewrap while serving:", flush=True)
    peak = wrk("tokenize.lua", b.url, b.vault.pid, b.env_for("tokenize", tpath), b.args)["rps"]
    base = b.at_rate("tokenize", tpath, peak / 2)
    admin(b, "POST", "/v1/admin/keys/rotate", {})
    env = {**b.env_for("tokenize", tpath), "TV_RATE": str(peak / 2), "TV_D": "3600"}
    load = subprocess.Popen(
        ["wrk", "-t", str(b.args.threads), "-c", str(b.args.connections), "-d", "3600s", "--timeout", "5s",
         "-s", "bench/tokenize.lua", b.url], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **env, "TV_CONNECTIONS": str(b.args.connections)})
    time.sleep(2)
    timeline, total, t0 = [], 0, time.time()
    while True:
        p = admin(b, "POST", "/v1/admin/keys/rewrap", {"batch": b.args.rewrap_batch})
        total += p.get("rewrapped", 0)
        timeline.append({"t": time.time() - t0, "rewrapped": total})
        if p.get("remaining", 0) == 0 or p.get("rewrapped", 0) == 0:
            break
    secs = time.time() - t0
    time.sleep(1)
    load.send_signal(signal.SIGINT)
    out = load.communicate()[0]
    line = next((l for l in out.splitlines() if l.startswith("BENCH ")), None)
    during = json.loads(line[6:]) if line else {}
    rate = total / secs if secs else 0
    print(f"  rewrapped {total} records in {secs:.1f} s ({rate:.0f}/s); tokenize p99 {base['p99_us'] / 1000:.2f} ms "
          f"before, {during.get('p99_us', 0) / 1000:.2f} ms during "
          f"(non-2xx {during.get('status')}, errors {during.get('connect', 0) + during.get('read', 0)})",
          flush=True)
    return {"records": total, "seconds": secs, "records_per_sec": rate, "timeline": timeline,
            "tokenize_before": base, "tokenize_during": during}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="tokenize,detokenize,metadata,charge,ivr_day,concurrency,sizes,rewrap")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seed-tokens", type=int, default=5000, help="cards stored before the first scenario")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--rewrap-batch", type=int, default=10000, help="records per admin rewrap call (max 10000)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                   help="where tokenvault, tokenvault-mock-psp and examples/bare are (e.g. an older build)")
    args = p.parse_args()
    global VAULT, MOCK_PSP, BARE
    VAULT = os.path.join(args.bin_dir, "tokenvault")
    MOCK_PSP = os.path.join(args.bin_dir, "tokenvault-mock-psp")
    BARE = os.path.join(args.bin_dir, "examples", "bare")
    for binary in (VAULT, MOCK_PSP, BARE):
        if not os.path.exists(binary):
            raise SystemExit(f"missing {binary}: run `cargo build --release --bins --example bare` first")
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run(args)


if __name__ == "__main__":
    main()
