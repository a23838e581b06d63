"""`evotok bench` as a library call: tasks x decoders x swept values, batched, sharded and resumable.

Order of work: check everything that can be wrong without the model (tasks, decoders, options, sweep,
data, generation settings), then load the model once, then for each run generate the items that no
sample file holds yet, batch by batch, appending each batch to this process's sample file. Above batch
size 1, items are batched in prompt-length order (each process's share, stably sorted) so that a shared
forward pads little; sample files are then in that order, results.json in doc order. After all processes
are done, rank 0 reads every sample file and writes results.json.

Each item samples from its own generator seeded with `seed + doc_id`, so it gets the same noise whatever
the batch size, the number of processes or interruptions (rng=reference replays one stream instead).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import CheckpointError, ConfigError
from evotok_cli.base.files import not_an_input, output_dir
from evotok_cli.base.locks import acquire_dir
from evotok_cli.bench import samples
from evotok_cli.bench.plan import BenchRequest, Run, plan, resolve_data
from evotok_cli.bench.tasks.base import Doc, Task
from evotok_cli.jobs.config import checked_model_folder as model_path


# -- running -----------------------------------------------------------------------------------------
def run_bench(request: BenchRequest) -> dict[str, Any] | None:
    """Run the request; returns the results document on rank 0 (None on the other ranks)."""
    tasks = checked_tasks(request)
    output_dir(request.out, "--out")  # before any data or model is loaded
    lock = acquire_dir(request.out, "--out")  # one bench per folder: a second one would redo every item
    try:
        return _run_locked(request, tasks)
    finally:
        if lock is not None:
            lock.release()


def checked_tasks(request: BenchRequest) -> list[Task]:
    """The request's tasks, after the checks that need neither data nor a model (local or --endpoint)."""
    from evotok_cli.bench.tasks import registry as task_registry
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.lora import check_lora_mode
    from evotok_cli.runtime.quantize import check_quantize

    check_lora_mode(request.lora_mode)
    check_padded_mode(request.padded_attention)
    check_quantize(request.quantize)
    if request.batch_size is not None and request.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {request.batch_size}", where="--batch-size",
                          fix="e.g. --batch-size 1 (the protocol's) or 8")
    limit = request.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a whole number >= 1, got {limit!r}", where="--limit", fix="e.g. --limit 50")
    if not request.tasks:
        raise ConfigError("no task given", where="evotok bench", fix="name one, e.g. `evotok bench gsm8k`")
    return [task_registry.get(name) for name in dict.fromkeys(request.tasks)]


def _run_locked(request: BenchRequest, tasks: list[Task]) -> dict[str, Any] | None:
    from evotok_cli.runtime import distributed

    folder = model_path(request.model)
    runs = plan(request, tasks, folder)
    data = resolve_data(request.data, tasks)
    check_not_outputs(data, runs, request.out)
    loaded = {t.name: t.load(data.get(t.name), request.limit) for t in tasks}
    group = distributed.from_environment()
    note = request.on_note if group.is_main and request.on_note else (lambda _line: None)
    for t in tasks:
        for line in loaded[t.name].notes:
            note(f"{t.name}: {line}")
    try:
        from evotok_cli.base.threads import apply as apply_threads

        request.threads = apply_threads(request.threads).threads  # recorded in results.json's config
        model = _load_model(request, folder, group)
        prompts = {t.name: render(t, loaded[t.name].docs, model) for t in tasks}
        check_lengths(runs, prompts, model)
        if request.batch_size is None:
            _choose_batch_size(request, runs, prompts, model, note)
        for run in runs:
            execute(run, loaded[run.task.name].docs, prompts[run.task.name], model, request, group, note)
        group.barrier()
        if not group.is_main:
            return None
        from evotok_cli.bench.results import build_document, write_atomic
        document = build_document(request, runs, loaded, model, group.world)
        request.out.mkdir(parents=True, exist_ok=True)
        write_atomic(request.out / "results.json", document)
        return document
    finally:
        group.close()


def _choose_batch_size(request: BenchRequest, runs: list[Run], prompts: dict[str, dict[int, Any]], model: Any,
                       note: Callable[[str], None]) -> None:
    """--batch-size not given: as many rows as the device holds (bench/batching.py), said in a note."""
    from evotok_cli.bench.batching import default_batch_size

    positions = max((len(p.ids) + run.settings["gen_length"] for run in runs
                     for p in prompts[run.task.name].values()), default=1)
    request.batch_size, request.batch_auto = default_batch_size(model, positions), True
    note(f"batch size {request.batch_size} (the default on {model.device.type}; --batch-size N chooses)")


def check_not_outputs(data: dict[str, Path], runs: list[Run], out: Path) -> None:
    """A --data file must not be one this bench writes (results.json, a run's sample file)."""
    import re

    names = [re.escape(run.name) + r"(\.rank\d+)?\.jsonl" for run in runs]
    for path in data.values():
        if not path.is_file():
            continue
        not_an_input(out / "results.json", "--out", {"--data": path})
        in_out = os.path.realpath(path.parent) == os.path.realpath(out)
        if in_out and any(re.fullmatch(name, path.name) for name in names):
            not_an_input(path, "--out", {"--data": path})


def _load_model(request: BenchRequest, folder: Path, group: Any) -> Any:
    from evotok_cli.runtime.model import load_model

    model = load_model(folder, adapter=request.adapter, device=group.device(request.device), dtype=request.dtype,
                       compile=request.compile, lora_mode=request.lora_mode,
                       padded_attention=request.padded_attention, quantize=request.quantize)
    if model.tokenizer is None:
        raise CheckpointError("the checkpoint has no tokenizer, so benchmark prompts cannot be encoded",
                              where=str(folder), fix="add tokenizer.json (and a chat template) to the folder")
    return model


def render(task: Task, docs: list[Doc], model: Any) -> dict[int, Any]:
    """doc_id -> Prompt (the rendered string and its token ids)."""
    from evotok_cli.runtime.prompts import Prompt
    from evotok_cli.runtime.tokenizer import encode

    prompts = {}
    for doc in docs:
        text = task.render(model.tokenizer, doc)
        prompts[doc.doc_id] = Prompt(text, ids=encode(model.tokenizer, text))
    return prompts


def check_lengths(runs: list[Run], prompts: dict[str, dict[int, Any]], model: Any) -> None:
    """Fail before generating when a prompt plus the generated span cannot fit the model, or a decoder
    option is beyond what the model allows (k_soft above the vocabulary)."""
    from evotok_cli.decoding.api import check_model_options

    for run in runs:
        check_model_options(getattr(run.decoder, "config", None), model, where="--sweep" if run.sweep else "--opt")
        table = prompts[run.task.name]
        if not table:
            continue
        doc_id, prompt = max(table.items(), key=lambda kv: len(kv[1].ids))
        total = len(prompt.ids) + run.settings["gen_length"]
        if total > model.max_length:
            raise ConfigError(f"{run.task.name} doc {doc_id}: prompt ({len(prompt.ids)} tokens) + gen length "
                              f"({run.settings['gen_length']}) = {total} exceeds the model's maximum "
                              f"{model.max_length}", where=str(model.path),
                              fix="use a shorter --gen-length or a model with a longer context")


def finished(run: Run, out: Path, prompts: dict[int, Any]) -> set[int]:
    """doc_ids that some sample file of this run already holds, after checking they belong to it."""
    done: set[int] = set()
    for path in samples.paths_of(out, run.name):
        for record in samples.read(path):
            if record.get("setup") != run.setup:
                stored = record.get("setup") or {}
                diff = sorted(k for k in set(stored) | set(run.setup) if stored.get(k) != run.setup.get(k))
                raise ConfigError(f"holds samples of another setup (differs in {', '.join(diff) or 'format'})",
                                  where=str(path), fix="pass another --out, or delete the file to start over")
            doc_id = int(record["doc_id"])
            if doc_id in prompts and record.get("prompt") != prompts[doc_id].text:
                raise ConfigError(f"doc {doc_id} was generated from another prompt (data or chat template changed)",
                                  where=str(path), fix="pass another --out, or delete the file to start over")
            done.add(doc_id)
    return done


def execute(run: Run, docs: list[Doc], prompts: dict[int, Any], model: Any, request: BenchRequest,
            group: Any, note: Callable[[str], None]) -> None:
    """Generate and score this process's share of the run's items that no sample file holds yet."""
    from evotok_cli.jobs.generation import generate

    done = finished(run, request.out, prompts)
    todo = [d for d in group.shard(docs) if d.doc_id not in done]
    mine = len(group.shard(docs))
    if done and todo:
        note(f"{run.name}: resuming, {mine - len(todo)} of {mine} items already done")
    if not todo:
        return
    path = samples.path_for(request.out, run.name, group.rank, group.world)
    settings = run.settings
    if getattr(run.decoder, "reference_rng", False):
        _execute_release_stream(run, todo, done, prompts, model, request, group, path)
        return
    size = request.batch_size
    if request.batch_auto:  # 50 items at most 16 a batch: 13, 13, 12, 12 (bench/batching.py)
        from evotok_cli.bench.batching import even_batches

        size = even_batches(len(todo), size)
    if size > 1 and not request.batch_auto:  # similar prompt lengths together: less padding in a shared forward
        # (the default batch keeps the items' order, so that sample files read in doc order as at batch 1)
        todo.sort(key=lambda d: len(prompts[d.doc_id].ids))  # stable: equal lengths keep doc order
    with samples.Writer(path) as writer:
        for first in range(0, len(todo), size):
            batch = todo[first:first + size]
            before = mine - len(todo) + first
            on_pass = None
            if request.on_pass is not None:
                def on_pass(n: int, rows: int = len(batch), before: int = before) -> None:
                    request.on_pass(run, n, rows, before, mine)
            results, wall = generate(
                model, run.decoder_name, run.decoder, [prompts[d.doc_id] for d in batch],
                gen_length=settings["gen_length"], block_length=settings["block_length"], steps=settings["steps"],
                temperature=settings["temperature"], seed=None, seeds=[request.seed + d.doc_id for d in batch],
                batch_size=len(batch), on_pass=on_pass)  # an item samples from seed + its doc_id, whatever the batch
            # each item's share of its batch's wall time: summed over a run, that is the run's decode time
            writer.write([record(run, doc, result, wall / len(batch), model, group.rank)
                          for doc, result in zip(batch, results)])
            if request.on_batch is not None:
                request.on_batch(run, mine - len(todo) + first + len(batch), mine)


def _execute_release_stream(run: Run, todo: list[Doc], done: set[int], prompts: dict[int, Any], model: Any,
                            request: BenchRequest, group: Any, path: Path) -> None:
    """rng=reference: the release evaluates with one random stream seeded once and continued across its
    items in order (each process its own share, every process with the same seed), so the items are one
    sequential job and their samples are written when it ends. A partial run cannot resume: the stream
    would have to be replayed through the finished items."""
    from evotok_cli.jobs.generation import generate

    if done:
        raise ConfigError(f"{run.name}: rng=reference replays one random stream from the first item, so a "
                          "partly finished run cannot resume", where=str(path),
                          fix="pass a fresh --out (or delete this run's sample files)")
    settings = run.settings
    results, wall = generate(
        model, run.decoder_name, run.decoder, [prompts[d.doc_id] for d in todo], gen_length=settings["gen_length"],
        block_length=settings["block_length"], steps=settings["steps"], temperature=settings["temperature"],
        seed=request.seed, batch_size=1)
    with samples.Writer(path) as writer:
        writer.write([record(run, doc, result, wall / len(todo), model, group.rank)
                      for doc, result in zip(todo, results)])
    if request.on_batch is not None:
        request.on_batch(run, len(todo), len(todo))


def record(run: Run, doc: Doc, result: dict[str, Any], seconds: float, model: Any, rank: int) -> dict[str, Any]:
    """One sample line. The scored text is the whole generated span decoded with special tokens kept,
    as the protocol decodes it (`generation` given: a plain server's text, bench --endpoint)."""
    generation = result["generation"] if "generation" in result else model.decode(result["token_ids"])
    extracted, correct = run.task.score(generation, doc.target)
    line = {"doc_id": doc.doc_id, "index": doc.index, "task": run.task.name, "decoder": run.decoder_name,
            "sweep": run.sweep or None, "prompt": result["prompt"], "generation": generation,
            "extracted": extracted, "target": doc.target, "correct": bool(correct)}
    extra = run.task.extra_scores(generation, doc.target)
    if extra:
        line["scores"] = extra
    line.update({"nfe": result["nfe"], "tokens": result["tokens"], "seconds": seconds, "rank": rank,
                 "setup": run.setup})
    return line
