#!/usr/bin/env python3
"""Every panel of the Grafana dashboard, evaluated by a real Prometheus.

Starts the mock PSP, a dev vault (debug build, as `cargo test` left it) and
Prometheus scraping the vault every second; drives a short mixed load that
touches every metric the dashboard shows (tokenize, reads, detokenize, charges
authorised / refused / PSP errors, a capture and a refund, a voice-connector
tokenize, failed credentials, a rate limit, a detokenize anomaly, a card-number
enumeration); then runs every panel's every query through Prometheus's HTTP API.
A query that returns no series (a panel whose metric does not exist, or a
misspelled label) fails the check. Prints each panel with its series count.

    python3 .ci/dashboard_check.py [DASHBOARD_JSON]
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "debug", "tokenvault")
MOCK = os.path.join(ROOT, "target", "debug", "tokenvault-mock-psp")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait(url, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"{url} never answered")


def call(method, url, token=None, body=None, headers=None, basic=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if basic:
        req.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except Exception:
            return e.code, None


def luhn(body):
    total = 0
    for i, d in enumerate(reversed(body)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return body + str((10 - total % 10) % 10)


def main():
    board = json.load(open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "helm/tokenvault/files/dashboard.json")))
    work = tempfile.mkdtemp(prefix="tv-dashboard-")
    procs = []
    try:
        psp_port, vault_port, prom_port = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([MOCK, "--listen", f"127.0.0.1:{psp_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        data = os.path.join(work, "data")
        procs.append(subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{vault_port}", "--data-dir", data,
             "--psp-url", f"http://127.0.0.1:{psp_port}",
             "--rate-limit", "tokenize=1000", "--rate-limit", "detokenize=1000",
             "--rate-limit", "charges=1000", "--rate-limit", "other=3",
             "--anomaly-window", "60s", "--anomaly-floor", "5", "--anomaly-cooldown", "1m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        vault = f"http://127.0.0.1:{vault_port}"
        wait(vault + "/healthz")
        wait(f"http://127.0.0.1:{psp_port}/__received")
        prom_cfg = os.path.join(work, "prometheus.yml")
        with open(prom_cfg, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: tokenvault
    static_configs:
      - targets: ["127.0.0.1:{vault_port}"]
""")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={work}/tsdb",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        prom = f"http://127.0.0.1:{prom_port}"
        wait(prom + "/-/ready")

        def jwt(role):
            return subprocess.check_output([BIN, "dev", "token", "--role", role, "--data-dir", data]).decode().strip()

        edge, crm, psp = jwt("edge"), jwt("crm"), jwt("psp")
        voice = subprocess.check_output([BIN, "dev", "voice-credentials", "--data-dir", data]).decode().strip()

        # A first scrape before the load, so that every rate has a starting point.
        time.sleep(3)
        tokens = []
        for i in range(40):
            st, body = call("POST", vault + "/v1/tokens", edge,
                            {"pan": luhn("4%014d" % (12345678 + i * 7919)), "exp_month": 12, "exp_year": 2031})
            assert st == 201, (st, body)
            tokens.append(body["token"])
        for t in tokens[:10]:
            call("GET", vault + f"/v1/tokens/{t}", crm)
        for _ in range(20):  # other=3/s: some of these are rate-limited
            call("GET", vault + "/v1/tokens?limit=5", crm)
        call("POST", vault + "/v1/detokenize", "not.a.jwt", {"token": tokens[0]})
        for i, (value, capture) in enumerate([(1000, "manual"), (1151, "automatic"), (1500, "automatic"),
                                              (2000, "automatic"), (1105, "automatic")]):
            st, charge = call("POST", vault + "/v1/charges", psp,
                              {"token": tokens[i], "amount": {"value": value, "currency": "EUR"},
                               "reference": f"order-{i}", "shopper_interaction": "moto", "capture": capture},
                              {"Idempotency-Key": f"dash-{i}"})
            if i == 0:
                assert st == 201, (st, charge)
                cid = charge["id"]
                st, _ = call("POST", vault + f"/v1/charges/{cid}/captures", psp, {}, {"Idempotency-Key": "cap-0"})
                assert st == 201, st
                st, _ = call("POST", vault + f"/v1/charges/{cid}/refunds", psp,
                             {"amount": {"value": 300, "currency": "EUR"}}, {"Idempotency-Key": "ref-0"})
                assert st == 201, st
        # The PSP connector detokenizes far above its baseline: flagged.
        for t in tokens[10:20]:
            call("POST", vault + "/v1/detokenize", psp, {"token": t})
        # Card-number enumeration: many cards behind one BIN and last four.
        for mid in range(8):
            for d in range(10):
                pan = "411111%05d%d1111" % (mid * 37, d)
                if luhn(pan[:-1]) == pan:
                    call("POST", vault + "/v1/tokens", edge, {"pan": pan, "exp_month": 1, "exp_year": 2032})
                    break
        st, _ = call("POST", vault + "/v1/connectors/voice-pay", None,
                     {"method": "tokenize", "transaction_id": "dash-1", "cardnumber": "4111111111111111",
                      "expiry_month": "08", "expiry_year": "39"}, basic=voice)
        assert st == 200, st
        # Scrapes after the load (the rates need two samples in their window).
        time.sleep(6)

        missing, lines = [], []
        for panel in board["panels"]:
            counts = []
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                res = json.load(urllib.request.urlopen(url, timeout=30))
                if res.get("status") != "success":
                    missing.append(f"{panel['title']}: {expr}: {res}")
                    counts.append(0)
                    continue
                n = len(res["data"]["result"])
                counts.append(n)
                if n == 0:
                    missing.append(f"{panel['title']}: no series for {expr}")
            lines.append(f"  {panel['title']}: {' + '.join(map(str, counts))} series")
        print(f"dashboard: {len(board['panels'])} panels evaluated by Prometheus")
        print("\n".join(lines))
        if missing:
            print("panels without data:\n  " + "\n  ".join(missing))
            sys.exit(1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except Exception:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
