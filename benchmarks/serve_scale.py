"""`evotok serve` scaled out with Ray Serve replicas (issue 26, item 5): throughput and p50/p99 latency at
each concurrency for the single-process server (the reference) and for 1 and 2 Ray replicas, in one run.

Each server is started in turn on the bundled model (loopback, a free port, a Ray cluster of its own with
its temporary folder under a fresh /tmp directory), warmed up, then N closed-loop clients send chat
requests for held-out sudoku4 / arith-small problems (each client sends its next request when the previous
one is answered) for a fixed number of requests per level. Every server gets --threads 1 per engine (a Ray
replica is pinned to one CPU), so 2 replicas use 2 cores. Temperature 0: the replicas' texts must equal the
single-process server's, which is checked. Writes benchmarks/results/serve_scale.json and .md.

    python benchmarks/serve_scale.py                              # levels 1, 16, 64; 1 and 2 replicas
    python benchmarks/serve_scale.py --levels 1,4 --requests 8 --replicas 1 --no-write   # a smoke check

Targets: at concurrency 16, 2 replicas >= 1.7x one replica's throughput (on 2 free cores); at concurrency 1,
1 replica's p50 <= 1.1x the single-process server's (what Ray's proxy adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from evotok_cli.training.synthetic import data_problems  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def prompts(count: int) -> list[str]:
    half = (count + 1) // 2
    pairs = zip(data_problems("sudoku4", "test", half, 0), data_problems("arith-small", "test", half, 0))
    return [p.question for pair in pairs for p in pair][:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `evotok serve` process (single or with Ray replicas), up once it says it serves."""

    def __init__(self, label: str, args: list[str], max_rows: int, log_dir: Path):
        self.label, self.port = label, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="evb", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}
        env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", RAY_TMPDIR=str(self.ray_tmp),
                   RAY_USAGE_STATS_ENABLED="0")
        self.log = log_dir / f"{label}.log"
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "evotok_cli", "serve", "--port", str(self.port),
                                          "--max-rows", str(max_rows), "--threads", "1", "--grace", "2", *args],
                                         stdout=handle, stderr=subprocess.STDOUT, env=env)
        marker = "as Ray Serve replicas" if args else "evotok serve:"
        deadline = time.monotonic() + 300
        while marker not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{label} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def load(url: str, items: list[str], concurrency: int) -> dict:
    """`concurrency` closed-loop clients over `items`; throughput in answer tokens/s and latency percentiles."""
    lock, latencies, texts, tokens = threading.Lock(), [], {}, [0]
    queue = list(enumerate(items))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    index, prompt = queue.pop(0)
                started = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}]})
                r.raise_for_status()
                body = r.json()
                with lock:
                    latencies.append(time.perf_counter() - started)
                    texts[index] = body["choices"][0]["message"]["content"]
                    tokens[0] += body["usage"]["completion_tokens"]

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"concurrency": concurrency, "requests": len(items), "wall_s": wall, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / wall, "requests_per_s": len(items) / wall, "p50_s": pct(0.5),
            "p99_s": pct(0.99), "texts": [texts[i] for i in range(len(items))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2x the level, >= 16)")
    parser.add_argument("--replicas", default="1,2", help="Ray replica counts to measure")
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="print only (a smoke check)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    setups = [("single", [])] + [(f"ray-{n}", ["--replicas", str(n)]) for n in map(int, args.replicas.split(","))]
    log_dir = Path(tempfile.mkdtemp(prefix="serve_scale_"))
    rows, reference = [], {}
    for label, extra in setups:
        server = Served(label, extra, args.max_rows, log_dir)
        try:
            load(server.url, prompts(4), 2)  # warm-up: every replica's first passes
            for level in levels:
                count = args.requests or max(16, 2 * level)
                result = load(server.url, prompts(count), level)
                texts = result.pop("texts")
                if label == "single":
                    reference[level] = texts
                result["same_texts_as_single"] = texts == reference.get(level)
                rows.append({"server": label, **result})
                print(f"{label:8s} c={level:3d} {result['tokens_per_s']:8.1f} tok/s  p50 {result['p50_s']:.2f}s  "
                      f"p99 {result['p99_s']:.2f}s  same texts: {result['same_texts_as_single']}", flush=True)
        finally:
            server.stop()

    def find(server: str, level: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["concurrency"] == level), None)

    checks = {}
    one, two = find("ray-1", 16), find("ray-2", 16)
    if one and two:
        checks["speedup_2_vs_1_at_16"] = two["tokens_per_s"] / one["tokens_per_s"]
    single1, ray1 = find("single", 1), find("ray-1", 1)
    if single1 and ray1:
        checks["proxy_p50_overhead_at_1"] = ray1["p50_s"] / single1["p50_s"] - 1
    document = {"command": " ".join(["python", "benchmarks/serve_scale.py", *sys.argv[1:]]),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows, "checks": checks,
                "targets": {"speedup_2_vs_1_at_16": ">= 1.7", "proxy_p50_overhead_at_1": "<= 0.10"}}
    print(json.dumps(checks, indent=2))
    shutil.rmtree(log_dir, ignore_errors=True)  # the servers' logs: kept only when one failed to start
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_scale.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [f"`{document['command']}` on {document['machine']['platform']} ({document['machine']['cpus']} CPUs)", "",
             "| server | concurrency | requests | tokens/s | p50 s | p99 s | texts = single |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
              f"{r['p99_s']:.2f} | {r['same_texts_as_single']} |" for r in rows]
    lines += ["", *(f"- {k}: {v:.3f} (target {document['targets'][k]})" for k, v in checks.items())]
    (RESULTS / "serve_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
