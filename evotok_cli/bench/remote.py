"""`evotok bench --endpoint URL`: the same tasks, prompts, seeds, scoring, sample files and results.json as a
local bench, with each item's generation asked of a running OpenAI-compatible server.

Prompts are rendered here with the tokenizer (and chat template) of `-m` (default: the bundled model), as a
local bench renders them, and sent to /v1/completions, which applies no template. Two kinds of server:

- evotok's own (`/v1/models` has an `evotok` section): the prompt goes as its token ids, with the run's
  decoder, all its options, gen_length, block_length, steps, temperature and the item's seed (seed +
  doc_id, choice 0 samples from the request's seed): the server decodes exactly the row a local bench
  decodes, and returns the span's token ids, which are decoded here with special tokens kept, so a sample
  line is the local one (but for its timing).
- any other: the visible prompt text with max_tokens = gen_length, temperature and seed; the decoder and
  its settings are the server's own (the run's decoder is recorded as "server"), the choice's text is what
  is scored, and NFE is unknown (0).

Items are asked `--concurrency` at a time and each answer is appended to the run's sample file as it
arrives, so a server that goes away mid-run loses only the items in flight: the same command resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from evotok_cli.base.errors import CheckpointError, ConfigError
from evotok_cli.base.files import output_dir
from evotok_cli.base.locks import acquire_dir
from evotok_cli.bench import samples
from evotok_cli.bench.config import DEFAULT_DECODER
from evotok_cli.bench.endpoint import Client, Server, completion, connect
from evotok_cli.bench.plan import BenchRequest, Run, plan, resolve_data
from evotok_cli.bench.runner import check_not_outputs, checked_tasks, finished, record, render
from evotok_cli.bench.tasks.base import Doc, Task
from evotok_cli.jobs.config import checked_model_folder

SERVER_DECODER = "server"  # the decoder of a plain server's runs: whatever it does


def run_remote(request: BenchRequest) -> dict[str, Any]:
    """Run the request against `request.endpoint`; the results document."""
    tasks = checked_tasks(request)
    check_local_flags(request)
    server, client = connect(request.endpoint or "", request.api_key)  # before any folder is made
    output_dir(request.out, "--out")
    lock = acquire_dir(request.out, "--out")
    try:
        return _run_locked(request, tasks, server, client)
    finally:
        if lock is not None:
            lock.release()


def check_local_flags(request: BenchRequest) -> None:
    """Flags that change the model belong to the server; given with --endpoint they would be silently
    ignored, so they are refused."""
    if request.adapter:
        raise ConfigError("--adapter changes the served model, which the server loads", where="--adapter",
                          fix="start the server with --adapter, and drop it here")
    if request.quantize != "none":
        raise ConfigError("--quantize changes the served model, which the server loads", where="--quantize",
                          fix="start the server with --quantize, and drop it here")


def _run_locked(request: BenchRequest, tasks: list[Task], server: Server, client: Client) -> dict[str, Any]:
    from evotok_cli.bench.results import build_document, write_atomic
    from evotok_cli.runtime.tokenizer import load_tokenizer

    folder = checked_model_folder(request.model)
    runs = evotok_runs(request, tasks, folder, server) if server.evotok else plain_runs(request, tasks, server)
    data = resolve_data(request.data, tasks)
    check_not_outputs(data, runs, request.out)
    loaded = {t.name: t.load(data.get(t.name), request.limit) for t in tasks}
    note = request.on_note or (lambda _line: None)
    for t in tasks:
        for line in loaded[t.name].notes:
            note(f"{t.name}: {line}")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CheckpointError("the checkpoint has no tokenizer, so benchmark prompts cannot be rendered",
                              where=str(folder), fix="pass -m the served model's folder (its tokenizer is used)")
    if server.evotok and server.model_id != folder.name:
        note(f"the server serves {server.model_id!r}; prompts are rendered with the tokenizer of {folder}")
    holder = SimpleNamespace(tokenizer=tokenizer)
    prompts = {t.name: render(t, loaded[t.name].docs, holder) for t in tasks}
    for run in runs:
        execute(run, loaded[run.task.name].docs, prompts[run.task.name], request, server, client, holder, note)
    model_info = {**server.describe(), "tokenizer": str(folder)}
    document = build_document(request, runs, loaded, None, 1, model_info=model_info)
    document["config"].update({"endpoint": server.url, "concurrency": request.concurrency})
    request.out.mkdir(parents=True, exist_ok=True)
    write_atomic(request.out / "results.json", document)
    return document


def evotok_runs(request: BenchRequest, tasks: list[Task], folder: Path, server: Server) -> list[Run]:
    """The local plan (decoders, options and settings checked here), each setup naming the served model
    instead of a local folder (a resume must find the same served model, not the same URL)."""
    runs = plan(request, tasks, folder)
    quantize = server.card["evotok"].get("quantize")
    for run in runs:  # as the local setup: quantize only when the model is quantized
        run.setup = {**run.setup, "model": f"served:{server.model_id}", "adapter": server.card.get("adapter"),
                     **({"quantize": quantize} if quantize not in (None, "none") else {})}
    return runs


def plain_runs(request: BenchRequest, tasks: list[Task], server: Server) -> list[Run]:
    """One run per task: the server decodes as it is set up; only gen_length (as max_tokens) and the
    temperature are asked for."""
    from evotok_cli.bench.plan import gen_value

    decoder_flags = request.decoders != [DEFAULT_DECODER] or request.options or request.sweeps
    if decoder_flags:
        raise ConfigError(f"{server.url} is not evotok's server (its /v1/models has no `evotok` section): it "
                          "decodes with its own settings", where="--decoder/--opt/--sweep",
                          fix="drop them, or serve the model with `evotok serve`")
    overrides = {k: gen_value(k, v, f"--{k.replace('_', '-')}") for k, v in request.overrides.items()
                 if v is not None and k in ("gen_length", "temperature")}
    runs = []
    for task in tasks:
        defaults = vars(task.defaults)
        settings = {"gen_length": overrides.get("gen_length", defaults["gen_length"]),
                    "temperature": overrides.get("temperature", defaults["temperature"]), "source": "server"}
        setup = samples.jsonable({"task": task.name, "protocol": task.protocol, "decoder": SERVER_DECODER,
                                  "options": {}, **settings, "seed": request.seed,
                                  "model": f"served:{server.model_id}"})
        runs.append(Run(task, SERVER_DECODER, None, {}, settings, setup, "",
                        samples.stem(task.name, SERVER_DECODER)))
    return runs


def body_for(run: Run, prompt: Any, seed: int, server: Server) -> dict[str, Any]:
    """The /v1/completions request of one item."""
    from evotok_cli.runtime.tokenizer import visible

    settings = run.settings
    if not server.evotok:
        return {"model": server.model_id, "prompt": visible(prompt.text), "max_tokens": settings["gen_length"],
                "temperature": settings["temperature"], "seed": seed}
    return {"model": server.model_id, "prompt": list(prompt.ids), "decoder": run.decoder_name,
            "options": run.setup["options"], "gen_length": settings["gen_length"],
            "block_length": settings["block_length"], "steps": settings["steps"],
            "temperature": settings["temperature"], "seed": seed}


def ask(client: Client, server: Server, run: Run, prompt: Any, seed: int, tokenizer: Any) -> dict[str, Any]:
    """One item's result in the shape `runner.record` reads."""
    started = time.monotonic()
    answer = completion(client, body_for(run, prompt, seed, server))
    seconds = time.monotonic() - started
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    result: dict[str, Any] = {"prompt": prompt.text, "seconds": seconds,
                              "tokens": int(usage.get("completion_tokens") or 0)}
    extension = answer.get("evotok") if isinstance(answer.get("evotok"), dict) else {}
    ids = (extension.get("token_ids") or [None])[0]
    if server.evotok and isinstance(ids, list):
        result["generation"] = tokenizer.decode(ids, skip_special_tokens=False)
        result["nfe"] = int((extension.get("nfe") or [0])[0])
    elif server.evotok:
        raise ConfigError("the server's answers carry no token ids (an evotok server older than this client)",
                          where=f"--endpoint {server.url}", fix="update the server's evotok")
    else:
        result["generation"] = str(answer["choices"][0].get("text") or "")
        result["nfe"] = int(usage.get("nfe") or 0)
    return result


def execute(run: Run, docs: list[Doc], prompts: dict[int, Any], request: BenchRequest, server: Server,
            client: Client, holder: Any, note: Callable[[str], None]) -> None:
    """Ask for the run's items that no sample file holds yet, `concurrency` at a time, writing each answer
    as it arrives. On an error, requests not yet sent are dropped, those in flight are awaited (their
    answers kept), and the error is raised."""
    done = finished(run, request.out, prompts)
    todo = [d for d in docs if d.doc_id not in done]
    if done and todo:
        note(f"{run.name}: resuming, {len(docs) - len(todo)} of {len(docs)} items already done")
    if not todo:
        return
    path = samples.path_for(request.out, run.name, 0, 1)
    pending: dict[Future, Doc] = {}
    queue = list(reversed(todo))
    failure: BaseException | None = None
    count = len(docs) - len(todo)
    last = time.monotonic()  # an item's seconds: the wall time since the previous answer landed, so that
    # summed over a run they are its wall time, as a local run's batch shares are (tok/s comparable)
    with samples.Writer(path) as writer, ThreadPoolExecutor(max_workers=request.concurrency) as pool:
        while queue or pending:
            while queue and failure is None and len(pending) < request.concurrency:
                doc = queue.pop()
                pending[pool.submit(ask, client, server, run, prompts[doc.doc_id], request.seed + doc.doc_id,
                                    holder.tokenizer)] = doc
            if not pending:
                break
            finished_now, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished_now:
                doc = pending.pop(future)
                try:
                    result = future.result()
                except BaseException as exc:  # noqa: BLE001 - kept, raised after the others land
                    failure = failure or exc
                    continue
                now = time.monotonic()
                seconds, last = now - last, now
                writer.write([record(run, doc, result, seconds, None, 0)])
                count += 1
                if request.on_batch is not None:
                    request.on_batch(run, count, len(docs))
    if failure is not None:
        raise failure
