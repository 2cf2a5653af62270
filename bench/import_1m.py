#!/usr/bin/env python3
"""Import benchmark: N generated cards (default 1 000 000) into a fresh dev vault
(release build) with `tokenvault import`, killed at 40 % and resumed; then checks
that the map has every good card once and the vault holds no duplicate.

    cargo build --release --bin tokenvault
    python3 bench/import_1m.py [N]

Prints the figures (time, rate, rejects) as JSON. The generated file lives in a
temporary directory and is deleted (shredded) at the end."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "tokenvault")


def luhn_digit(body):
    total = 0
    for i, d in enumerate(reversed(body)):
        n = int(d)
        if i % 2 == 0:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return str((10 - total % 10) % 10)


def card(i):
    body = "4%05d%09d" % (i % 100_000, i)
    return body + luhn_digit(body)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = tempfile.mkdtemp(prefix="tv-import-")
    data = os.path.join(work, "data")
    src = os.path.join(work, "legacy.csv")
    bad = 0
    with open(src, "w") as f:
        f.write("id,pan,exp_month,exp_year,name\n")
        for i in range(n):
            pan = card(i)
            if i % 10_007 == 5:  # a broken check digit now and then
                pan = pan[:-1] + str((int(pan[-1]) + 1) % 10)
                bad += 1
            f.write("cust-%d,%s,%d,2031,%s\n" % (i, pan, i % 12 + 1, "Ada Lovelace" if i % 2 else ""))
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    vault = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:%d" % port, "--data-dir", data],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    token = os.path.join(work, "importer.jwt")
    with open(token, "w") as f:
        f.write(subprocess.check_output([BIN, "dev", "token", "--role", "importer", "--tenant", "bench",
                                         "--data-dir", data]).decode().strip())
    mapf = os.path.join(work, "map.csv")
    args = [BIN, "import", src, "--format", "csv", "--url", url, "--token-file", token, "--map-out", mapf]

    t0 = time.time()
    dry = subprocess.run(args + ["--dry-run", "--rejects", os.path.join(work, "dry.csv"), "--json"],
                         capture_output=True, check=True)
    dry_s = time.time() - t0
    dry_summary = json.loads(dry.stderr.decode().strip().splitlines()[-1])

    t0 = time.time()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cp = mapf + ".checkpoint"
    while True:
        try:
            done = json.load(open(cp))["records"]
        except Exception:
            done = 0
        if done >= n * 4 // 10:
            break
        if child.poll() is not None:
            sys.exit("the import ended before 40 %")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = json.load(open(cp))["records"]
    first_s = time.time() - t0
    t1 = time.time()
    resumed = subprocess.run(args + ["--json"], capture_output=True, check=True)
    second_s = time.time() - t1
    summary = json.loads(resumed.stdout)

    ids, tokens = set(), set()
    rows = 0
    with open(mapf) as f:
        next(f)
        for line in f:
            cid, tok = line.split(",")[:2]
            ids.add(cid)
            tokens.add(tok)
            rows += 1
    stored = int(float([l for l in urllib.request.urlopen(url + "/metrics").read().decode().splitlines()
                        if l.startswith("tokenvault_tokens_stored ")][0].split()[1]))
    vault.send_signal(signal.SIGTERM)
    vault.wait()
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(data, "sled")) for f in fs)
    total_s = first_s + second_s
    print(json.dumps({
        "cards": n, "rejects_expected": bad, "dry_run": {"seconds": round(dry_s, 1), **dry_summary},
        "killed_at_records": killed_at, "first_run_seconds": round(first_s, 1),
        "resumed_run_seconds": round(second_s, 1), "total_seconds": round(total_s, 1),
        "cards_per_second": round(n / total_s), "imported": summary["imported"], "rejected": summary["rejected"],
        "map_rows": rows, "distinct_ids": len(ids), "distinct_tokens": len(tokens), "vault_records": stored,
        "sled_bytes": disk,
    }, indent=1))
    ok = rows == len(ids) == len(tokens) == n - bad == stored and summary["rejected"] == bad
    subprocess.run(["shred", "-u", src], check=False)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
