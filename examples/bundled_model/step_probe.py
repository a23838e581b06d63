"""Can the model compute a reasoning step, or only copy its result? A diagnostic for the bundled model.

For every calculation step of N test problems ("...20-5=" followed by "15"), the gold answer up to the "="
is fed unmasked and the result's digits are predicted from one forward pass each, left to right, in two
settings:

- `rest masked`: everything after the "=" is [MASK], as when decoding reaches that step;
- `copies visible`: only the result is [MASK]; the rest of the gold answer (the next step, which may
  start with this result, and the boxed answer) is visible.

A model that has learnt to compute scores alike in both; one that has learnt to copy scores high only in
the second. `--split train --seed S` probes the first N training problems of `evotok data TASK --seed S`
instead: a model that scores much higher there than on the test split has memorised problems rather than
learnt the steps.

    python examples/bundled_model/step_probe.py MODEL [--task arith] [--n 40] [--split train --seed 21]
"""

from __future__ import annotations

import argparse
import re

import torch

from evotok_cli.runtime import tokenizer as tok
from evotok_cli.runtime.model import load_model
from evotok_cli.training.synthetic import GENERATORS, PREFILL, data_problems

GEN_LENGTH = 48  # the bundled model's answer window


def steps(response: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the results in the reasoning: the digits after each '='."""
    reasoning = response.split("</reasoning>")[0]
    return [m.span(1) for m in re.finditer(r"=(\d+)", reasoning)]


@torch.no_grad()
def predict(model, ids: list[int], start: int, count: int) -> list[int]:
    """Fill positions start .. start+count-1 (all [MASK] in `ids`) left to right, one pass per token."""
    x = torch.tensor(ids, device=model.device)[None]
    out = []
    for i in range(count):
        token = int(model(input_ids=x)[0][start + i].argmax())
        x[0, start + i] = token
        out.append(token)
    return out


def probe(model, task: str, n: int, split: str = "test", seed: int = 0) -> dict[str, int]:
    """Counts of calculation steps and of results predicted right in each setting, over the first n problems
    of the split (for `train`, the order in which `evotok data` writes them with that seed)."""
    counts = {"steps": 0, "rest masked": 0, "copies visible": 0}
    chat = tok.has_chat_template(model.tokenizer)  # training appends end-of-turn only then
    eot = [model.eot_id] if model.eot_id is not None and chat else []
    for problem in data_problems(task, split, n, seed):
        prompt = tok.render_prompt(model.tokenizer, problem.question, chat=True, prefill=PREFILL)
        prompt_ids = tok.encode(model.tokenizer, prompt)
        body = problem.response[len(PREFILL):]
        for start, end in steps(body):
            before = tok.encode(model.tokenizer, prompt + body[:start])
            result = list(model.tokenizer(body[start:end], add_special_tokens=False)["input_ids"])
            after = list(model.tokenizer(body[end:], add_special_tokens=False)["input_ids"])
            window = len(prompt_ids) + GEN_LENGTH - len(before)
            masked = [model.mask_id] * len(result)
            rest_masked = before + [model.mask_id] * window
            tail = (after + eot + [model.eos_id] * window)[: window - len(result)]
            copies_visible = before + masked + tail
            counts["steps"] += 1
            counts["rest masked"] += predict(model, rest_masked, len(before), len(result)) == result
            counts["copies visible"] += predict(model, copies_visible, len(before), len(result)) == result
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--task", default="arith", choices=[t for t in GENERATORS if t != "sudoku4"])
    parser.add_argument("--n", type=int, default=40, help="problems to probe")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--seed", type=int, default=0, help="generator seed (the bench's test problems: 0)")
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    counts = probe(model, args.task, args.n, args.split, args.seed)
    total = counts["steps"]
    where = f"{args.n} {args.split} problems (seed {args.seed})"
    print(f"{args.task}: {total} steps of {where}; results predicted right with")
    for key in ("rest masked", "copies visible"):
        print(f"  {key:15s} {counts[key]:4d} / {total}  ({100 * counts[key] / total:.0f}%)")


if __name__ == "__main__":
    main()
