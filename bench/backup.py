#!/usr/bin/env python3
"""Online backup under load: N cards imported into a fresh dev vault (release build),
then tokenize traffic (wrk, paced) runs while `tokenvault backup` copies the vault;
the backup is verified, restored into an empty directory, the restored vault opens
every card acknowledged before the backup began (all N, by detokenize), and its audit
trail verifies offline.

    apt-get install -y wrk
    cargo build --release --bins
    python3 bench/backup.py [N] [RATE]      # default 100000 cards, tokenize paced at 1000 req/s

Prints the figures as JSON (also written to bench/results/backup.json)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(HERE, "..", "target", "release", "tokenvault")
sys.path.insert(0, HERE)
from import_1m import card, free_port  # noqa: E402  (the same generated cards)


def start(data, port):
    url = "http://127.0.0.1:%d" % port
    p = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:%d" % port, "--data-dir", data],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1)
            return p, url
        except Exception:
            time.sleep(0.1)
    sys.exit("the vault did not start")


def jwt(data, role, tenant="bench"):
    return subprocess.check_output([BIN, "dev", "token", "--role", role, "--tenant", tenant,
                                    "--data-dir", data]).decode().strip()


def wrk(url, token, seconds, rate, out):
    env = dict(os.environ, TV_JWT=token, TV_RATE=str(rate), TV_CONNECTIONS="16")
    r = subprocess.run(["wrk", "-t2", "-c16", "-d%ds" % seconds, "-s", os.path.join(HERE, "tokenize.lua"), url],
                       capture_output=True, env=env, cwd=os.path.join(HERE, ".."))
    line = [l for l in r.stdout.decode().splitlines() if l.startswith("BENCH ")][0]
    out.update(json.loads(line[6:]))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    work = tempfile.mkdtemp(prefix="tv-backup-")
    data = os.path.join(work, "data")
    src = os.path.join(work, "legacy.csv")
    with open(src, "w") as f:
        f.write("id,pan,exp_month,exp_year,name\n")
        for i in range(n):
            f.write("cust-%d,%s,%d,2031,\n" % (i, card(i), i % 12 + 1))
    vault, url = start(data, free_port())
    tok = {r: os.path.join(work, r + ".jwt") for r in ("importer", "operator", "edge")}
    for role, path in tok.items():
        with open(path, "w") as f:
            f.write(jwt(data, role))
    mapf = os.path.join(work, "map.csv")
    t0 = time.time()
    subprocess.run([BIN, "import", src, "--format", "csv", "--url", url, "--token-file", tok["importer"],
                    "--map-out", mapf, "--json"], capture_output=True, check=True)
    import_s = time.time() - t0
    subprocess.run(["shred", "-u", src], check=False)

    # Tokenize at a steady rate without the backup, then the same with the backup in the middle.
    quiet = {}
    wrk(url, open(tok["edge"]).read().strip(), 10, rate, quiet)
    loaded = {}
    load = threading.Thread(target=wrk, args=(url, open(tok["edge"]).read().strip(), 20, rate, loaded))
    load.start()
    time.sleep(5)
    out = os.path.join(work, "vault.tvbackup")
    t0 = time.time()
    b = subprocess.run([BIN, "backup", "--url", url, "--token-file", tok["operator"], "--out", out, "--json"],
                       capture_output=True)
    backup_s = time.time() - t0
    load.join()
    if b.returncode != 0:
        sys.exit("backup failed: " + b.stderr.decode())
    taken = json.loads(b.stdout)
    vault.send_signal(signal.SIGTERM)
    vault.wait()

    t0 = time.time()
    v = subprocess.run([BIN, "backup", "verify", out, "--json"], capture_output=True)
    verify_s = time.time() - t0
    restored = os.path.join(work, "restored")
    t0 = time.time()
    r = subprocess.run([BIN, "restore", out, "--data-dir", restored, "--json"], capture_output=True)
    restore_s = time.time() - t0
    if v.returncode != 0 or r.returncode != 0:
        sys.exit("verify/restore failed: " + v.stdout.decode() + r.stderr.decode())
    # The root key is not in a backup: bring the dev one as an operator brings the HSM.
    shutil.copytree(os.path.join(data, "dev"), os.path.join(restored, "dev"))
    shutil.copy(os.path.join(data, "keys", "dev-root.key"), os.path.join(restored, "keys", "dev-root.key"))
    copy, curl = start(restored, free_port())
    psp = jwt(restored, "psp")
    opened, wrong = 0, 0
    with open(mapf) as f:
        next(f)
        rows = [line.strip().split(",") for line in f]
    pans = {"cust-%d" % i: card(i) for i in range(n)}

    def check(chunk, res):
        for cid, token in chunk:
            req = urllib.request.Request(curl + "/v1/detokenize", data=json.dumps({"token": token}).encode(),
                                         headers={"Authorization": "Bearer " + psp,
                                                  "Content-Type": "application/json"})
            try:
                pan = json.load(urllib.request.urlopen(req, timeout=10))["pan"]
                res.append(pan == pans[cid])
            except Exception:
                res.append(False)

    t0 = time.time()
    results = [[] for _ in range(8)]
    threads = [threading.Thread(target=check, args=([(x[0], x[1]) for x in rows[k::8]], results[k]))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opened = sum(sum(1 for ok in res if ok) for res in results)
    wrong = sum(sum(1 for ok in res if not ok) for res in results)
    check_s = time.time() - t0
    copy.send_signal(signal.SIGTERM)
    copy.wait()
    a = subprocess.run([BIN, "audit", "--offline", "--data-dir", restored, "verify"], capture_output=True)
    figures = {
        "cards_imported": len(rows), "import_seconds": round(import_s, 1),
        "backup": {"seconds": round(backup_s, 2), "bytes": taken["bytes"],
                   "bytes_per_record": round(taken["bytes"] / max(taken["records"], 1)),
                   "records": taken["records"], "audit_records": taken["audit_records_verified"],
                   "write_pause_ms": taken["write_pause_ms"]},
        "tokenize_paced": {"rate": rate,
                           "without_backup": {"p50_ms": quiet["p50_us"] / 1000, "p99_ms": quiet["p99_us"] / 1000,
                                              "max_ms": quiet["max_us"] / 1000, "requests": quiet["requests"],
                                              "non_2xx": quiet["status"], "socket_errors": quiet["connect"]
                                              + quiet["read"] + quiet["write"] + quiet["timeout"]},
                           "with_backup": {"p50_ms": loaded["p50_us"] / 1000, "p99_ms": loaded["p99_us"] / 1000,
                                           "max_ms": loaded["max_us"] / 1000, "requests": loaded["requests"],
                                           "non_2xx": loaded["status"], "socket_errors": loaded["connect"]
                                           + loaded["read"] + loaded["write"] + loaded["timeout"]}},
        "verify_seconds": round(verify_s, 1), "restore_seconds": round(restore_s, 1),
        "restored": {"pre_backup_cards_opened": opened, "failed_or_wrong": wrong, "seconds": round(check_s, 1),
                     "audit_verify_exit": a.returncode,
                     "audit_verify": a.stdout.decode().strip().splitlines()[0] if a.stdout else ""},
    }
    print(json.dumps(figures, indent=1))
    with open(os.path.join(HERE, "results", "backup.json"), "w") as f:
        json.dump(figures, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if opened == len(rows) == n and wrong == 0 and a.returncode == 0 else 1)


if __name__ == "__main__":
    main()
