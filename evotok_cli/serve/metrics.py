"""GET /metrics: counters and gauges in the Prometheus text format (version 0.0.4), written by hand so the
server needs no client library. Metrics with a vLLM counterpart take its name with the `evotok:` prefix
(vllm:time_to_first_token_seconds -> evotok:time_to_first_token_seconds), so dashboards carry over."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SHORT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)


class Histogram:
    """Cumulative buckets, sum and count of observed seconds."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        total = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            yield f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {total}'
        yield f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count{{{labels}}} {self.count}" if labels else f"{name}_count {self.count}"


class Metrics:
    """What the server counts itself; the engine's counters are read when /metrics is asked for."""

    def __init__(self):
        self.requests: Counter[tuple[str, str]] = Counter()  # (route, status)
        self.cancelled: Counter[str] = Counter()  # requests cancelled, by reason
        self.rejected = 0  # 503 for a full queue
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency: dict[str, Histogram] = {}  # per route: request start to its last byte
        self.first_text = Histogram(SHORT_BUCKETS)  # arrival to the first answer text sent
        self.queue_time = Histogram(SHORT_BUCKETS)  # arrival to its first row joining the running batch
        self.e2e = Histogram()  # arrival to the whole answer, answered requests only
        self.finished: Counter[str] = Counter()  # choices answered, by finish_reason

    def queued(self, session: Any, arrival: float) -> None:
        """A request's time in the queue, once it is over (not counted when no row of it ever ran)."""
        admitted = [job.admitted for _, job in session.jobs if job.admitted is not None]
        if admitted:
            self.queue_time.observe(max(0.0, min(admitted) - arrival))

    def answered(self, seconds: float, reasons: list[str], *, whole: bool = False) -> None:
        """A completion answered in full after `seconds`; `whole`: its first text was the whole answer."""
        self.e2e.observe(seconds)
        if whole:
            self.first_text.observe(seconds)
        self.finished.update(reasons)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, str(status))] += 1
        if route.startswith("/v1/") and route.endswith("completions"):
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def render(self, engine: Any, *, waiting: int, in_flight: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Any]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("evotok_requests_total", "counter", "HTTP requests answered, by route and status",
               [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.requests.items())])
        metric("evotok_requests_cancelled_total", "counter",
               "completion requests whose decoding was cancelled, by reason (disconnect, timeout, shutdown)",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.cancelled.items())])
        metric("evotok_requests_rejected_total", "counter", "requests refused with 503 because the queue was full",
               [("", self.rejected)])
        metric("evotok_prompt_tokens_total", "counter", "prompt tokens of answered requests",
               [("", self.prompt_tokens)])
        metric("evotok_completion_tokens_total", "counter",
               "answer tokens generated (up to the first stop id), as usage.completion_tokens",
               [("", self.completion_tokens)])
        metric("evotok_forward_passes_total", "counter", "model forward passes run (a shared forward counts once)",
               [("", engine.passes)])
        metric("evotok_engine_steps_total", "counter", "engine steps run", [("", engine.steps)])
        metric("evotok_live_rows", "gauge", "rows being decoded now", [("", engine.live_rows)])
        metric("evotok_tokens_in_flight", "gauge", "canvas positions (prompt + generated) of the rows being decoded",
               [("", getattr(engine, "live_tokens", 0))])
        metric("evotok_max_tokens_in_flight", "gauge", "the engine's admission budget in canvas positions "
               "(--max-tokens-in-flight; 0: none)", [("", getattr(engine, "max_tokens", None) or 0)])
        metric("evotok_step_retries_total", "counter", "engine steps split in two after running out of memory",
               [("", getattr(engine, "retries", 0))])
        metric("evotok_preemptions_total", "counter", "jobs whose KV slots were dropped and requeued, to be "
               "recomputed when admitted again (a step out of memory, or the budget lowered)",
               [("", getattr(engine, "preemptions", 0))])
        metric("evotok_merged_rows_total", "counter", "requests' rows that decoded as rows of one program with "
               "others admitted in the same step (same decoder, options and settings)",
               [("", getattr(engine, "merged_rows", 0))])
        metric("evotok_queue_length", "gauge", "requests waiting for room in the engine", [("", waiting)])
        metric("evotok_requests_in_flight", "gauge", "completion requests whose rows are decoding or waiting",
               [("", in_flight)])
        out.append("# HELP evotok_request_duration_seconds completion request latency, arrival to last byte")
        out.append("# TYPE evotok_request_duration_seconds histogram")
        for route, hist in sorted(self.latency.items()):
            out.extend(hist.lines("evotok_request_duration_seconds", f'route="{route}"'))
        running = max(0, in_flight - waiting)
        metric("evotok:num_requests_running", "gauge", "completion requests with rows being decoded",
               [("", running)])
        metric("evotok:num_requests_waiting", "gauge", "completion requests waiting for room", [("", waiting)])
        metric("evotok:request_success_total", "counter", "choices answered in full, by finish_reason",
               [(f'{{finished_reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
        for name, hist, help_text in (
                ("evotok:time_to_first_token_seconds", self.first_text,
                 "arrival to the first answer text sent (a streamed request: its first text delta; "
                 "otherwise the whole answer)"),
                ("evotok:request_queue_time_seconds", self.queue_time,
                 "arrival to the first of the request's rows joining the running batch"),
                ("evotok:e2e_request_latency_seconds", self.e2e, "arrival to the whole answer, answered requests")):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} histogram")
            out.extend(hist.lines(name))
        return "\n".join(out) + "\n"
