"""Latency and throughput of ``ufad serve`` at 1 and 2 replicas, measured in one run.

    python tools/bench_serve.py                       # starts a 2-node loopback cluster itself
    python tools/bench_serve.py --address HOST:PORT   # an existing cluster
    python tools/bench_serve.py --markdown serve.md --json serve.json

For each replica count: start ``ufad serve MODEL --replicas R`` on the cluster, warm up, then
``--repeats`` times run ``--clients`` closed-loop clients (one keep-alive HTTP connection
each, POST /score with ``--inputs`` inputs as npy_b64) for ``--seconds``; report the median
over repeats of p50 / p99 latency and of throughput. Every answer is checked (status 200, one
record per input). The clients run on the same machine as the cluster, so on few cores they
compete with it for CPU: compare the rows, do not read them as the server's ceiling.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "runtime" / "data" / "mnist_small.onnx"
DIGITS = ROOT / "tests" / "runtime" / "data" / "digits.npy"
UFAD = [sys.executable, "-m", "ufad.runtime.cli"]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(env: dict[str, str], temp: str) -> str:
    """A 2-node Ray cluster on loopback, one CPU per node (as tests/test_ray.py)."""
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
              "--object-store-memory", str(200 * 2 ** 20)]
    subprocess.run([*RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                    "--temp-dir", temp, *common], env=env, check=True, capture_output=True)
    subprocess.run([*RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                   capture_output=True)
    return f"127.0.0.1:{port}"


def start_server(model: Path, replicas: int, address: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([*UFAD, "serve", str(model), "--replicas", str(replicas), "--port", str(port),
                             "--address", address], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ufad serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("ufad serve did not come up in 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def body(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return json.dumps({"npy_b64": base64.b64encode(buf.getvalue()).decode()}).encode()


def load(port: int, bodies: list[bytes], n_inputs: int, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` closed-loop clients for ``seconds``: latencies (ms) and throughput."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        k = c
        while time.monotonic() < stop:
            t = time.perf_counter()
            conn.request("POST", "/score", bodies[k % len(bodies)], {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            lat[c].append((time.perf_counter() - t) * 1e3)
            if r.status != 200 or len(json.loads(data)["results"]) != n_inputs:
                raise SystemExit(f"bad answer {r.status}: {data[:200]!r}")
            k += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.concatenate([np.asarray(x) for x in lat])
    return {"requests": int(len(all_lat)), "p50_ms": float(np.percentile(all_lat, 50)),
            "p99_ms": float(np.percentile(all_lat, 99)), "requests_per_s": len(all_lat) / wall,
            "inputs_per_s": len(all_lat) * n_inputs / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: start one on loopback)")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--inputs", type=int, default=1, help="inputs per request")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    digits = np.load(DIGITS)
    rng = np.random.default_rng(0)
    bodies = [body(digits[rng.integers(0, len(digits), args.inputs)]) for _ in range(64)]
    temp = tempfile.mkdtemp(prefix="ufad-bench-ray-")
    address = args.address or start_cluster(env, temp)
    rows = []
    try:
        for replicas in (int(r) for r in args.replicas.split(",")):
            proc, port = start_server(args.model, replicas, address, env)
            try:
                load(port, bodies, args.inputs, args.clients, 2.0)  # warm-up
                runs = [load(port, bodies, args.inputs, args.clients, args.seconds) for _ in range(args.repeats)]
            finally:
                stop_server(proc)
            row = {"replicas": replicas, "clients": args.clients, "inputs_per_request": args.inputs,
                   **{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}
            rows.append(row)
            print(f"replicas {replicas}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                  f"{row['requests_per_s']:.0f} requests/s ({row['inputs_per_s']:.0f} inputs/s)", flush=True)
    finally:
        if not args.address:
            subprocess.run([*RAY, "stop", "--force"], env=env, capture_output=True)
    table = ["| replicas | clients | inputs / request | p50 latency | p99 latency | throughput |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['replicas']} | {r['clients']} | {r['inputs_per_request']} | {r['p50_ms']:.1f} ms | "
              f"{r['p99_ms']:.1f} ms | {r['requests_per_s']:.0f} requests/s ({r['inputs_per_s']:.0f} inputs/s) |"
              for r in rows]
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
