"""`evotok serve` under load: tokens/s and p50/p99 latency at concurrency 1, 4, 16, 64 on the bundled model,
against the offline `evotok generate --batch-size N` on the same prompts.

Starts one server (loopback only, a free port, --max-rows 16 unless told otherwise), sends chat requests
for held-out sudoku4 and arith-small problems from N closed-loop clients (each sends its next request when
the previous one is answered), then runs `evotok generate --prompts-file ... --batch-size N --json` on
the same prompts and compares. Temperature 0: the server's texts must equal generate's, which is checked.
Writes benchmarks/results/serve_load.json and .md.

    python benchmarks/serve_load.py                      # levels 1, 4, 16, 64 (a few minutes on 2 CPU cores)
    python benchmarks/serve_load.py --levels 1,16 --device cuda
    python benchmarks/serve_load.py --levels 16 --cache dual --out /tmp/sl-dual     # the fast paths (issue 25)
    python benchmarks/serve_load.py --levels 16 --decoder d2f --out /tmp/sl-d2f
    python benchmarks/serve_load.py --levels 16 --checkout /tmp/evotok-before --out /tmp/sl-before   # an older commit

`--checkout DIR` runs the server and `generate` of another checkout (e.g. `git worktree add /tmp/evotok-before
e177cff`, the commit before the batched engine) with this script, so a "before" number is the same
measurement: the children import DIR's `evotok_cli` and its `plugins/` as `evotok_plugins`.

Targets (issue 16): throughput at concurrency 16 >= 0.9x offline batch-16 throughput; p99 latency at
concurrency 16 <= 2x the offline time of one batch of 16 (the offline wall time / number of batches).
Both processes get the same thread count (--threads, default 1: the machine is shared).

The load generator runs on the same cores as the server, which the offline run has to itself: it must
cost next to nothing. Its clients connect before the clock starts, all start at once, and speak HTTP/1.1
keep-alive with http.client (`--client stdlib`: ~0.6 ms of CPU per request on 2 cores; `--client httpx`
~1.7 ms); each run reports the generator's CPU seconds. Until issue 25 each run built its 16 httpx clients
inside the timed window, 0.44 s of CPU (each loads the CA bundle) in a ~2 s run of d2f at c16: the ratio
read 0.74-0.84 where this generator reads 0.90-0.94 for the same server.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from evotok_cli.training.synthetic import data_problems  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SUMMARY = re.compile(r"NFE (\d+), (\d+) answer tokens in ([0-9.]+)s")


def prompts(count: int) -> list[str]:
    """Held-out problems of the bundled model's two quick tasks, interleaved."""
    half = (count + 1) // 2
    pairs = zip(data_problems("sudoku4", "test", half, 0), data_problems("arith-small", "test", half, 0))
    return [p.question for pair in pairs for p in pair][:count]


def share(concurrency: int, args) -> int:
    """Requests at one level: four per client, at least 8, at most --prompts (bounded run time)."""
    return min(args.prompts, max(8, 4 * concurrency))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int, checkout: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if checkout is not None:
        env["PYTHONPATH"] = str(shim(checkout))
    return env


def plugins_folder(checkout: Path) -> Path:
    """The folder that installs as `evotok_plugins`: plugins/evotok_plugins since the layer folders, plugins/
    in older checkouts."""
    inner = checkout / "plugins" / "evotok_plugins"
    return inner if inner.is_dir() else checkout / "plugins"


def shim(checkout: Path) -> Path:
    """A folder that makes `import evotok_cli` and `import evotok_plugins` load `checkout`'s code (it comes
    first on PYTHONPATH, before the installed package), with `checkout`'s entry points: the installed ones
    name the modules of this checkout, which an older tree may not have."""
    digest = hashlib.sha256(str(checkout.resolve()).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"evotok-shim-{digest}"
    folder.mkdir(exist_ok=True)
    for name, target in (("evotok_cli", checkout / "evotok_cli"), ("evotok_plugins", plugins_folder(checkout))):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    try:
        import tomllib  # Python 3.11+; on 3.10 the installed entry points are used
    except ImportError:
        return folder
    project = tomllib.loads((checkout / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    info = folder / f"evotok-{project['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: evotok\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
        for group, points in groups.items()))
    return folder


def request_fields(args) -> dict:
    """The decoder settings every request carries (the server's defaults otherwise)."""
    fields = {} if args.decoder is None else {"decoder": args.decoder}
    if args.cache != "none":
        fields["options"] = {"cache": args.cache}
    return fields


def generate_flags(args) -> list[str]:
    flags = [] if args.decoder is None else ["--decoder", args.decoder]
    return flags + ([] if args.cache == "none" else ["--opt", f"cache={args.cache}"])


def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "evotok_cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--max-rows",
           str(args.max_rows), "--max-queue", "256", "--device", args.device]
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                env=child_env(args.threads, args.checkout), cwd=args.checkout)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def load(url: str, questions: list[str], concurrency: int, limit_s: float, fields: dict | None = None,
         client: str = "stdlib") -> dict:
    """`concurrency` closed-loop clients over `questions`; latency per request, tokens/s over the wall. The
    clock starts once every client has its connection (`connect`), all at once."""
    todo = list(enumerate(questions))
    lock = threading.Lock()
    latencies, tokens, texts, errors = [], [0], {}, []
    stop_at = time.monotonic() + limit_s
    start = threading.Barrier(concurrency + 1)

    def run(post: Callable[[dict], tuple[int, str]]) -> None:
        start.wait()
        while time.monotonic() < stop_at:
            with lock:
                if not todo:
                    return
                i, q = todo.pop(0)
            t0 = time.perf_counter()
            status, text = post({"messages": [{"role": "user", "content": q}], "temperature": 0, **(fields or {})})
            seconds = time.perf_counter() - t0
            with lock:
                if status != 200:
                    errors.append(f"{status} {text[:200]}")
                    continue
                body = json.loads(text)
                latencies.append(seconds)
                tokens[0] += body["usage"]["completion_tokens"]
                texts[i] = body["choices"][0]["message"]["content"]

    posts = [connect(url, client, limit_s) for _ in range(concurrency)]
    threads = [threading.Thread(target=run, args=(post,)) for post in posts]
    engine_before = engine_counts(url)
    for t in threads:
        t.start()
    start.wait()
    t0, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    engine = {k: v - engine_before.get(k, 0) for k, v in engine_counts(url).items()}
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
            "client_cpu_s": round(cpu, 3), "engine": engine,
            "tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 2),
            "latencies": latencies, "texts": [texts.get(i) for i in range(len(questions))]}


ENGINE_METRICS = {"evotok_engine_steps_total": "steps", "evotok_forward_passes_total": "forwards",
                  "evotok_merged_rows_total": "merged_rows"}


def engine_counts(url: str) -> dict[str, float]:
    """The server's engine counters (`/metrics`; an older server may lack some): read before and after a
    run, their difference says how many steps the run took and how many of its rows decoded merged."""
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ENGINE_METRICS:
            counts[ENGINE_METRICS[name]] = float(value)
    return counts


def connect(url: str, client: str, limit_s: float) -> Callable[[dict], tuple[int, str]]:
    """One client's keep-alive connection, made before the clock starts (building an httpx client costs
    ~27 ms of CPU): a function that posts a chat request and returns (status, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    path, head = "/v1/chat/completions", {"Content-Type": "application/json"}
    if client == "httpx":
        session = httpx.Client(timeout=limit_s)

        def post_httpx(body: dict) -> tuple[int, str]:
            r = session.post(url + path, json=body)
            return r.status_code, r.text
        return post_httpx
    conn = http.client.HTTPConnection(host, int(port), timeout=limit_s)
    conn.connect()

    def post(body: dict) -> tuple[int, str]:
        conn.request("POST", path, json.dumps(body), head)
        r = conn.getresponse()
        return r.status, r.read().decode()
    return post


def level(url: str, questions: list[str], concurrency: int, args, work: Path) -> dict:
    """Server and offline runs alternated --repeats times, so that both meet the same neighbours on a
    shared machine; throughput over the summed walls, latency percentiles over every request."""
    runs = [(load(url, questions, concurrency, args.limit_s, request_fields(args), args.client),
             offline(questions, concurrency, args, work))
            for _ in range(args.repeats)]
    served, alone = [r[0] for r in runs], [r[1] for r in runs]
    latencies = [x for r in served for x in r.pop("latencies")]
    s_wall, s_tokens = sum(r["wall_s"] for r in served), sum(r["tokens"] for r in served)
    o_wall, o_tokens = sum(r["wall_s"] for r in alone), sum(r["tokens"] for r in alone)
    batches = -(-len(questions) // concurrency) * len(alone)
    server = {"concurrency": concurrency, "requests": sum(r["requests"] for r in served),
              "errors": [e for r in served for e in r["errors"]], "wall_s": round(s_wall, 3), "tokens": s_tokens,
              "tokens_per_s": round(s_tokens / s_wall, 2), "p50_s": round(percentile(latencies, 50), 3),
              "p99_s": round(percentile(latencies, 99), 3), "runs_tokens_per_s": [r["tokens_per_s"] for r in served],
              "client_cpu_s": round(sum(r["client_cpu_s"] for r in served), 3),
              "engine": {k: sum(r["engine"][k] for r in served) for k in ENGINE_METRICS.values()
                         if all(k in r["engine"] for r in served)}}
    offline_ = {"batch_size": concurrency, "prompts": len(questions), "wall_s": round(o_wall, 3), "tokens": o_tokens,
                "tokens_per_s": round(o_tokens / o_wall, 2), "batch_time_s": round(o_wall / batches, 3),
                "runs_tokens_per_s": [r["tokens_per_s"] for r in alone], "command": alone[0]["command"]}
    return {"server": server, "offline": offline_,
            "throughput_ratio": server["tokens_per_s"] / offline_["tokens_per_s"],
            "p99_over_batch_time": server["p99_s"] / offline_["batch_time_s"],
            "texts_equal": all(r["texts"] == alone[0]["texts"] for r in served + alone)}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def offline(questions: list[str], batch: int, args, work: Path) -> dict:
    """`evotok generate --batch-size N --json` on the same prompts: wall time from its summary line."""
    path = work / f"prompts-{batch}.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    cmd = [sys.executable, "-m", "evotok_cli", "generate", "--prompts-file", str(path), "--batch-size", str(batch),
           "--device", args.device, "--json", *generate_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads, args.checkout),
                          cwd=args.checkout, timeout=args.limit_s * 2)
    if proc.returncode != 0:
        raise SystemExit(f"generate failed:\n{proc.stderr}")
    nfe, tokens, wall = SUMMARY.search(proc.stderr).groups()
    results = json.loads(proc.stdout)["results"]
    batches = -(-len(questions) // batch)
    return {"batch_size": batch, "prompts": len(questions), "wall_s": float(wall), "tokens": int(tokens),
            "tokens_per_s": round(int(tokens) / float(wall), 2), "batch_time_s": round(float(wall) / batches, 3),
            "texts": [r["text"] for r in results], "command": " ".join(["evotok", *cmd[3:]])}


def markdown(report: dict) -> str:
    lines = [f"# evotok serve under load ({report['created']})", "",
             f"Model: bundled evotok-tiny, chat requests at temperature 0, server `--max-rows {report['max_rows']}`, "
             f"{report['threads']} torch thread(s) per process, device {report['device']}, {report['machine']}; "
             f"decoder {report.get('decoder') or 'default'}, cache {report.get('cache', 'none')}, "
             f"load generator {report.get('client', 'httpx')} (its CPU: {cpu_note(report)}), "
             f"code at {report.get('git')}.", "",
             "| concurrency | requests | server tok/s (runs) | offline tok/s, batch N (runs) | ratio | p50 s | p99 s "
             "| offline batch time s | p99 / batch time | texts equal | server steps | rows merged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["levels"]:
        s, o = row["server"], row["offline"]
        runs = (f"{s['tokens_per_s']} ({', '.join(map(str, s['runs_tokens_per_s']))})",
                f"{o['tokens_per_s']} ({', '.join(map(str, o['runs_tokens_per_s']))})")
        lines.append(f"| {s['concurrency']} | {s['requests']} | {runs[0]} | {runs[1]} | "
                     f"{row['throughput_ratio']:.2f} | {s['p50_s']} | {s['p99_s']} | {o['batch_time_s']} | "
                     f"{row['p99_over_batch_time']:.2f} | {row['texts_equal']} | {engine_note(s)} |")
    t = report["targets"]
    lines += ["", f"Targets at concurrency 16: throughput >= 0.9x offline: **{t['throughput']}**; "
              f"p99 <= 2x offline batch time: **{t['p99']}**.", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def engine_note(server: dict) -> str:
    """The server's engine steps and how many of its requests' rows decoded merged (`/metrics`)."""
    engine = server.get("engine") or {}
    if "steps" not in engine:
        return "? | ?"
    merged = engine.get("merged_rows")
    rows = "? (no metric)" if merged is None else f"{merged:.0f} of {server['requests']}"
    return f"{engine['steps']:.0f} | {rows}"


def cpu_note(report: dict) -> str:
    """The load generator's CPU seconds over the server's wall seconds, per level."""
    return ", ".join(f"{s.get('client_cpu_s', '?')} s in {s['wall_s']} s at c{s['concurrency']}"
                     for s in (r["server"] for r in report["levels"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16,64", help="client concurrencies")
    parser.add_argument("--prompts", type=int, default=64,
                        help="distinct prompts; a level sends min(this, max(8, 4 x clients))")
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of generate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="server and offline runs per level, alternated")
    parser.add_argument("--limit-s", type=float, default=300.0, help="time cap of one run")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load")
    parser.add_argument("--decoder", default=None, help="decoder of every request and of generate [server default]")
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                        help="the decoder's KV cache option (hard-mask, evotoken)")
    parser.add_argument("--client", default="stdlib", choices=["stdlib", "httpx"],
                        help="the load generator's HTTP client (httpx: ~3x the CPU per request)")
    parser.add_argument("--checkout", type=Path, default=None,
                        help="run another checkout's server and generate (a 'before' number)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    questions = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, url = start_server(args, work / "server.log")
        try:
            load(url, questions[:2], 1, args.limit_s, request_fields(args), args.client)  # warm-up
            rows = [level(url, questions[:share(c, args)], c, args, work) for c in levels]
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
    at16 = next((r for r in rows if r["server"]["concurrency"] == 16), None)
    report = {
        "schema": "evotok.serve_load/1", "created": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "device": args.device, "threads": args.threads, "max_rows": args.max_rows, "server_exit_code": code,
        "decoder": args.decoder, "cache": args.cache, "client": args.client,
        "checkout": None if args.checkout is None else str(args.checkout),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=args.checkout or ROOT).stdout.strip(),
        "levels": rows,
        "targets": {"throughput": None if at16 is None else at16["throughput_ratio"] >= 0.9,
                    "p99": None if at16 is None else at16["p99_over_batch_time"] <= 2.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
