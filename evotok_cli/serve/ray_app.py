"""`evotok serve --replicas N` / `--ray-address ADDR`: the same app as Ray Serve replicas behind Ray's proxy.

Imported only when one of those flags is given, so the single-process server never loads ray. Each replica
is one Ray actor holding one model and one step engine, built by `cli._start` exactly as the single-process
server builds them, and answers with the same ASGI app (every route, stream mode, error object and the page),
which Ray Serve mounts as the deployment's ingress (`serve.ingress()` with `__serve_build_asgi_app__`).

Choices (docs/serve.md, "More than one machine"):
- Routing: Ray Serve's default router, power of two choices on each replica's queue length, with
  `max_ongoing_requests` = --max-rows (the engine's row capacity): a replica is sent no more requests than
  its engine can decode together, so requests wait at the router for the first replica with room instead
  of in one replica's queue while another idles. Beyond --max-queue requests waiting at the router, Ray
  answers 503 (`max_queued_requests`).
- Autoscaling: --min-replicas/--max-replicas with --target-ongoing-requests (default: --max-rows, a full
  engine per replica) become Ray Serve's autoscaling_config; --replicas is the starting count.
- Resources: one GPU per replica when this machine has CUDA and --device is not cpu, else one CPU (and
  torch's threads follow: Ray sets OMP_NUM_THREADS to the actor's CPUs, which `threads.apply` honours
  unless --threads is given).
- /metrics: the app's own Prometheus text, aggregated. Every replica pushes its text each second to one
  named Ray actor (`MetricsBoard`, owned by the `evotok serve` process); whichever replica answers
  /metrics (after the app's own key check) returns every live replica's samples, each with a `replica`
  label. Ray's own metrics (ray_serve_*) stay on Ray's metrics export port.
- --api-key is checked by the app inside every replica, i.e. at the ingress deployment before any route.
- Shutdown: SIGTERM or Ctrl-C deletes the application; Ray Serve stops routing to it and gives requests in
  flight --grace seconds (`graceful_shutdown_timeout_s`) before the replicas are killed; exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from evotok_cli.base import stopping as stop_signals
from evotok_cli.base.errors import CheckpointError, ConfigError
from evotok_cli.serve.ray_metrics import MetricsBoard, merge_metrics

APP_NAME = "evotok"
NAMESPACE = "evotok"  # the Ray namespace of the metrics board (and of this driver)
BOARD_NAME = "evotok-metrics"
PUSH_EVERY_S = 1.0
CONSTRUCTOR_TRIES = 3  # replica starts that may fail before the deploy fails (Ray's default: 20)
JOIN_FIX = ("start one with `ray start --head`, or pass its address; a cluster with token authentication (Ray's "
            "default since 2.5x) also needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token")
INSTALL_FIX = 'pip install -e ".[ray]" (or pip install "ray[serve]>=2.40")'


def require_ray(flag: str) -> None:
    """One line when ray[serve] is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError("replicas need Ray Serve, which is not installed", where=flag, fix=INSTALL_FIX) from None


def check_scaling(opts: Any) -> None:
    """The scaling flags' one-line errors, before anything starts."""
    for name in ("replicas", "min_replicas", "max_replicas"):
        value = getattr(opts, name)
        if value is not None and value < (0 if name == "min_replicas" else 1):
            raise ConfigError(f"{value} is not a valid number of replicas", where=f"--{name.replace('_', '-')}",
                              fix="e.g. 2")
    low, high = opts.min_replicas, opts.max_replicas
    if (low is None) != (high is None):
        raise ConfigError("autoscaling needs both bounds", where="--min-replicas/--max-replicas",
                          fix="give both, e.g. --min-replicas 1 --max-replicas 4")
    if low is not None and low > high:
        raise ConfigError(f"--min-replicas {low} is above --max-replicas {high}", where="--min-replicas",
                          fix="make it at most --max-replicas")
    start = opts.replicas
    if low is not None and start is not None and not low <= start <= high:
        raise ConfigError(f"--replicas {start} is outside [{low}, {high}]", where="--replicas",
                          fix="start inside the autoscaling bounds")
    target = opts.target_ongoing_requests
    if target is not None and not target > 0:
        raise ConfigError(f"{target} is not a positive number of requests", where="--target-ongoing-requests",
                          fix="e.g. --target-ongoing-requests 8")


def deployment_options(opts: Any, gpus: bool) -> dict[str, Any]:
    """Ray Serve's deployment options for these flags (see the module's docstring for why)."""
    options: dict[str, Any] = {
        "name": "EvotokReplica",
        "ray_actor_options": {"num_gpus": 1} if gpus else {"num_cpus": 1},
        "max_ongoing_requests": opts.max_rows,
        "max_queued_requests": opts.max_queue if opts.max_queue > 0 else -1,
        "graceful_shutdown_timeout_s": opts.grace,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if opts.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
            "initial_replicas": opts.replicas if opts.replicas is not None else max(1, opts.min_replicas),
            "target_ongoing_requests": opts.target_ongoing_requests or opts.max_rows,
            "upscale_delay_s": 2.0, "downscale_delay_s": 60.0, "metrics_interval_s": 1.0,
            "look_back_period_s": 4.0}
    else:
        options["num_replicas"] = opts.replicas or 1
    return options


def wants_gpus(opts: Any) -> bool:
    if opts.device not in ("auto",) and not str(opts.device).startswith("cuda"):
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch CUDA: CPUs
        return False


class ReplicaApp:
    """The replica's ASGI app: the server's app, plus a header naming the replica (`x-evotok-replica`:
    id and pid, for logs and the fault tests) and /metrics answered for every replica."""

    def __init__(self, app: Any, service: Any, replica: str, board: Any):
        self.app, self.service, self.replica, self.board = app, service, replica, board
        self.tag = f"{replica} {os.getpid()}".encode()

    def local_text(self) -> str:
        s = self.service
        return s.metrics.render(s.engine, waiting=s.waiting(), in_flight=len(s.sessions))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = scope.get("path", "").rstrip("/") == "/metrics" and scope.get("method") == "GET"
        held: list[dict] = []

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-evotok-replica", self.tag)]}
                if metrics and message.get("status") == 200:
                    held.append(message)
                    return
            elif held:  # /metrics: the local body is replaced by every replica's
                if message.get("more_body"):
                    return
                await self._send_all(held[0], send)
                return
            await send(message)

        await self.app(scope, receive, tagged)

    async def _send_all(self, start: dict, send: Any) -> None:
        import asyncio

        texts = {self.replica: self.local_text()}
        if self.board is not None:
            try:
                others = await asyncio.wait_for(asyncio.wrap_future(self.board.all.remote().future()), 5.0)
                texts = {**others, **texts}
            except Exception:  # noqa: BLE001 - the board is gone: this replica's own samples
                pass
        body = merge_metrics(texts).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def make_deployment(folder: Path, defaults: dict, opts: Any, start: Any) -> Any:
    """The Ray Serve application: one `EvotokReplica` deployment, bound to its arguments. `start` is the
    single-process server's `cli._start` (model, engine, app), passed in so this module does not import
    the command's."""
    from ray import serve

    @serve.ingress()
    class EvotokReplica:
        def __init__(self, folder: Path, defaults: dict, opts: Any, start: Any):
            import ray

            from evotok_cli.base.threads import apply as apply_threads
            from evotok_cli.serve.config import limits

            apply_threads(opts.threads)
            self.service, app = start(folder, defaults, opts, limits(opts))
            context = serve.get_replica_context()
            self.replica = getattr(context, "replica_id", None)
            self.replica = getattr(self.replica, "unique_id", None) or str(self.replica or os.getpid())
            try:
                self.board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
            except ValueError:
                self.board = None
            self.asgi = ReplicaApp(app, self.service, self.replica, self.board)
            self.stopped = threading.Event()
            threading.Thread(target=self._push, daemon=True, name="evotok-metrics").start()

        def __serve_build_asgi_app__(self) -> Any:
            return self.asgi

        def _push(self) -> None:
            while self.board is not None and not self.stopped.wait(PUSH_EVERY_S):
                try:
                    self.board.put.remote(self.replica, self.asgi.local_text())
                except Exception:  # noqa: BLE001 - the board is gone (shutdown)
                    return

        def check_health(self) -> None:
            """Ray restarts a replica whose engine thread died."""
            thread = getattr(self.service.background, "thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError("the step engine's thread has stopped")

        def __del__(self) -> None:
            stopped = getattr(self, "stopped", None)
            if stopped is not None:
                stopped.set()

    gpus = wants_gpus(opts)
    options = deployment_options(opts, gpus)
    import inspect

    if "max_constructor_retry_count" in inspect.signature(serve.deployment).parameters:  # Ray >= 2.50 or so
        options["max_constructor_retry_count"] = CONSTRUCTOR_TRIES  # a model that cannot load fails at once
    deployment = serve.deployment(EvotokReplica, **options)
    return deployment.bind(folder, defaults, opts, start), gpus


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(folder: Path, defaults: dict, opts: Any, start: Any) -> None:
    """Start (or join) a Ray cluster, deploy, announce, wait for SIGTERM / Ctrl-C, then drain and exit."""
    import ray
    from ray import serve

    from evotok_cli.base.console import stderr

    port = opts.port or free_port(opts.host)
    _check_port(opts.host, port)
    stopping = threading.Event()
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    init: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "runtime_env": env,
                            "configure_logging": False}
    if opts.ray_address:
        init["address"] = opts.ray_address
    else:
        init.update(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, _wanted_cpus(opts)))
    try:
        ray.init(**init)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        what = "join the Ray cluster" if opts.ray_address else "start a Ray cluster"
        raise ConfigError(f"cannot {what} ({' '.join(str(exc).split())[:200]})",
                          where="--ray-address" if opts.ray_address else "--replicas", fix=JOIN_FIX) from None
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stopping.set())
    err = stderr()
    try:
        stop_signals.check()  # one came during start-up and was swallowed (base/stopping.py): stop before deploying
        board = ray.remote(num_cpus=0)(MetricsBoard).options(name=BOARD_NAME, namespace=NAMESPACE,
                                                              get_if_exists=True).remote()
        serve.start(http_options={"host": opts.host, "port": port}, detached=bool(opts.ray_address))
        app, gpus = make_deployment(folder, defaults, opts, start)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            _wait_running(stopping)
        except Exception as exc:  # noqa: BLE001 - a replica that cannot start: one line
            why = _bounded_status() or str(exc)
            why = why.removeprefix("evotok_cli.base.errors.")
            raise CheckpointError(f"the replicas did not start ({' '.join(why.split())[:600]})",
                                  where=str(folder), fix="check the model loads with `evotok generate -m FOLDER`") \
                from None
        if not stopping.is_set():
            err.print(f"evotok serve: {opts.served_model_name or folder.name} as Ray Serve replicas "
                      f"({_scale_words(opts)}, one {'GPU' if gpus else 'CPU'} each, max rows {opts.max_rows}) on "
                      f"http://{opts.host}:{port}{', API key required' if opts.api_key else ''}; SIGTERM or "
                      "Ctrl-C stops", highlight=False)
        while not stopping.wait(0.5):
            pass
        err.print(f"evotok serve: draining (up to {opts.grace:g}s)", highlight=False)
        if not _bounded(lambda: serve.delete(APP_NAME), opts.grace + 30.0):
            print("warning: the Ray application did not stop in time; leaving it to Ray", file=sys.stderr)
        _bounded(lambda: ray.kill(board), 10.0)
    finally:  # a cluster this process started goes with it (Ray's processes, the proxy included)
        ray.shutdown()
    print("evotok serve: stopped", file=sys.stderr)


def _bounded(work: Any, seconds: float) -> bool:
    """`work()` in a daemon thread, waited for at most `seconds` (a cluster whose raylet died would block
    Ray's calls for ever); whether it finished."""
    done = threading.Event()

    def target() -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - shutdown goes on whatever Ray says
            pass
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done.wait(seconds)


def _wait_running(stopping: threading.Event, timeout: float = 900.0) -> None:
    """Until the application runs; a deploy failure raises with Ray's message."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while not stopping.is_set():
        status = serve.status().applications.get(APP_NAME)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(_why(status))
        if time.monotonic() > deadline:
            raise RuntimeError("not running after 900 s")
        time.sleep(0.5)


def _bounded_status() -> str | None:
    """Why the application failed, from Ray Serve's status (None when it cannot be read)."""
    from ray import serve

    try:
        status = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - the controller is gone: Ray's exception says enough
        return None
    return _why(status) if status is not None else None


def _why(status: Any) -> str:
    """The replicas' own error (the last `SomeError: ...` line of a deployment's message, e.g. the model's
    CheckpointError), else the application's message."""
    for deployment in (getattr(status, "deployments", None) or {}).values():
        lines = [ln.strip() for ln in str(getattr(deployment, "message", "")).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.split(":", 1)[0].rstrip().endswith(("Error", "Exception"))]
        if errors:
            return errors[-1]
    return status.message or str(status.status)


def _check_port(host: str, port: int) -> None:
    """A port in use is one line before Ray starts (Ray's proxy would only log it)."""
    from evotok_cli.serve.server import bind

    bind(host, port).close()


def _wanted_cpus(opts: Any) -> int:
    return opts.max_replicas or opts.replicas or 1


def _scale_words(opts: Any) -> str:
    if opts.min_replicas is not None:
        return f"{opts.min_replicas} to {opts.max_replicas} replicas, autoscaled"
    return f"{opts.replicas or 1} replica{'s' if (opts.replicas or 1) != 1 else ''}"
