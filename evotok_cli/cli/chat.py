"""`evotok chat`: a conversation in the terminal, like `llm chat`.

Each user line joins the history, and the whole history goes through the model's chat template (with the
prefill after it), so the model sees every earlier turn; the answer is printed on stdout and joins the
history as the assistant's turn. `--show` draws the canvas evolving while a turn decodes. Lines that start
with `/` are commands (`/help`). `--log FILE` appends one JSON line per turn, `{"messages": [...], ...}`,
which `evotok generate --prompts-file FILE` replays (the same settings give the same answers).

Imported by the CLI at start-up for its options: torch and the model load inside `run`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from evotok_cli.base.errors import ConfigError, EvotokError
from evotok_cli.base.options import Cli, like, option
from evotok_cli.jobs.config import GenerateOptions, loads_model

GEN_SETTINGS = ("gen_length", "block_length", "steps", "temperature", "seed")  # what /opt may set besides options
HELP = """commands:
  /decoder NAME   decode the next turns with another decoder (its options start from its defaults)
  /opt KEY=VALUE  set a decoder option, or gen_length, block_length, steps, temperature, seed
  /clear          forget the conversation (the system message stays)
  /save FILE      write the conversation and settings as JSON
  /quit           end (so does end of input, Ctrl-D)"""


@dataclass
@loads_model(before="show")
class ChatOptions:
    """`evotok chat`'s options: `evotok generate`'s model and decoding options (those of how the model loads,
    --compile among them, before --show: `loads_model`), and the transcript log."""

    model: str | None = like(GenerateOptions, "model")
    adapter: str | None = like(GenerateOptions, "adapter")
    decoder: str = like(GenerateOptions, "decoder")
    opt: list[str] | None = like(GenerateOptions, "opt")
    gen_length: int = like(GenerateOptions, "gen_length")
    block_length: int = like(GenerateOptions, "block_length")
    steps: int = like(GenerateOptions, "steps")
    temperature: float = like(GenerateOptions, "temperature")
    seed: int = like(GenerateOptions, "seed")
    system: str | None = like(GenerateOptions, "system")
    prefill: str = like(GenerateOptions, "prefill")
    show: bool = option(False, "watch the canvas evolve on stderr while each answer decodes", yaml=False)
    log: str | None = option(None, "append each turn to this JSONL file ({\"messages\": [...], \"answer\", ...}; "
                             "`evotok generate --prompts-file FILE` replays it)", cli=Cli(type=Path))


class Chat:
    """The conversation and its settings; `turn` answers one user line, `command` handles one `/` line."""

    def __init__(self, lm: Any, decoder_name: str, options: dict[str, Any], settings: dict[str, Any], *,
                 system: str | None, prefill: str, show: bool, log: Path | None, err: Any):
        from evotok_cli.jobs.generation import make_decoder

        self.lm, self.decoder_name, self.options, self.settings = lm, decoder_name, dict(options), dict(settings)
        self.decoder = make_decoder(decoder_name, self.options)
        self.system, self.prefill, self.show, self.log, self.err = system, prefill, show, log, err
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def turn(self, text: str) -> str:
        """Decode the answer to `text` after the history; on an error the history is left as it was."""
        from evotok_cli.base.files import check_text
        from evotok_cli.jobs.generation import check_settings, generate
        from evotok_cli.runtime.prompts import Prompt, encode_prompts
        from evotok_cli.viz.live import LiveCanvas

        check_text(text, "chat")
        s = self.settings
        check_settings(self.decoder, gen_length=s["gen_length"], block_length=s["block_length"], steps=s["steps"],
                       temperature=s["temperature"])
        messages = [*self.messages(), {"role": "user", "content": text}]
        prompt = Prompt(None, messages=messages)
        encode_prompts([prompt], self.lm.tokenizer, chat=True, vocab_size=self.lm.vocab_size, prefill=self.prefill,
                       mask_id=self.lm.mask_id)
        live = LiveCanvas(self.lm, self.err) if self.show else None
        with live or nullcontext():
            results, wall = generate(self.lm, self.decoder_name, self.decoder, [prompt], gen_length=s["gen_length"],
                                     block_length=s["block_length"], steps=s["steps"], temperature=s["temperature"],
                                     seed=s["seed"], batch_size=1, on_event=live.update if live else None)
        result = results[0]
        answer = self.prefill + result["text"]
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.err.print(f"[dim]{self.decoder_name}: NFE {result['nfe']}, {result['tokens']} tokens in {wall:.2f}s[/dim]")
        if self.log is not None:
            self._append_log(messages, answer, result)
        return answer

    def _append_log(self, messages: list[dict[str, str]], answer: str, result: dict[str, Any]) -> None:
        from evotok_cli.base.provenance import jsonable

        line = {"messages": messages, "answer": answer, "decoder": self.decoder_name,
                "options": jsonable(vars(self.decoder.config)), "settings": {**self.settings, "prefill": self.prefill},
                "nfe": result["nfe"]}
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    def command(self, line: str) -> bool:
        """Handle one `/` line; False ends the chat."""
        from evotok_cli.jobs.generation import make_decoder

        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.err.print(HELP, highlight=False)
        elif name == "clear":
            self.history = []
            self.err.print("[dim]conversation cleared[/dim]")
        elif name == "decoder":
            if not arg:
                raise ConfigError("no decoder named", where="/decoder", fix="e.g. /decoder evotoken")
            from evotok_cli.decoding import registry

            registry.get(arg, where="/decoder")  # an unknown name is named as this command's
            self.decoder = make_decoder(arg, {}, where="/decoder")
            self.decoder_name, self.options = arg, {}
            self.err.print(f"[dim]decoder {arg}[/dim]")
        elif name == "opt":
            self._set_option(arg)
        elif name == "save":
            self.save(arg)
        else:
            raise ConfigError(f"unknown command /{name}", where="chat", fix="/help lists the commands")
        return True

    def _set_option(self, arg: str) -> None:
        """/opt KEY=VALUE: a generation setting (checked against the decoder) or a decoder option."""
        from evotok_cli.jobs.config import parse_opts
        from evotok_cli.jobs.generation import check_settings, make_decoder

        if "=" not in arg:
            raise ConfigError(f"{arg!r} is not KEY=VALUE", where="/opt", fix="e.g. /opt steps=32 or /opt alpha=0.7")
        values = parse_opts([arg])
        for key, value in values.items():
            if key in GEN_SETTINGS:
                kind = float if key == "temperature" else int
                try:
                    number = kind(str(value).strip())
                except ValueError:
                    raise ConfigError(f"{key} must be {'a number' if kind is float else 'a whole number'}, got "
                                      f"{value!r}", where="/opt", fix=f"e.g. /opt {key}=32") from None
                if key == "seed":
                    from evotok_cli.base.options import check_seed

                    check_seed(number, where="/opt")
                trial = {**self.settings, key: number}
                check_settings(self.decoder, gen_length=trial["gen_length"], block_length=trial["block_length"],
                               steps=trial["steps"], temperature=trial["temperature"])
                self.settings = trial
            else:
                self.decoder = make_decoder(self.decoder_name, {**self.options, key: value}, where="/opt")
                self.options[key] = value
        self.err.print(f"[dim]{arg.strip()}[/dim]", highlight=False)

    def save(self, where: str) -> None:
        from evotok_cli.base.files import atomic_write_text, output_file

        if not where:
            raise ConfigError("no file named", where="/save", fix="e.g. /save chat.json")
        path = output_file(Path(where).expanduser(), "/save")
        document = {"schema": "evotok.chat/1", "messages": self.messages(), "decoder": self.decoder_name,
                    "options": self.options, "settings": {**self.settings, "prefill": self.prefill}}
        atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        self.err.print(f"[dim]saved {len(self.history) // 2} turns to {path}[/dim]")


def run(flags: dict[str, Any], *, stdin: TextIO | None = None, out: Callable[[str], None] = print) -> int:
    """The chat loop: read lines until /quit or end of input; returns the exit code (2 when a turn failed
    and input came from a pipe or file, so a script notices)."""
    from evotok_cli.base.console import stderr
    from evotok_cli.base.files import check_text, output_file
    from evotok_cli.base.options import merged, yaml_defaults
    from evotok_cli.base.threads import apply as apply_threads
    from evotok_cli.jobs.config import Settings, generate_defaults, model_folder, parse_opts
    from evotok_cli.jobs.generation import make_decoder
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.lora import check_lora_mode
    from evotok_cli.runtime.model import load_model
    from evotok_cli.runtime.quantize import check_quantize

    stdin = stdin or sys.stdin
    defaults, kinds = yaml_defaults(ChatOptions)
    settings = Settings(defaults, None, command="chat", types=kinds)
    options = parse_opts(flags.get("opt"))
    make_decoder(settings.get("decoder", flags.get("decoder")), options)  # before the (slow) load
    folder = model_folder(settings.get("model", flags.get("model")))
    settings.defaults = {**defaults, **generate_defaults(folder)}  # the model's own gen_length, steps, prefill
    values = merged(ChatOptions, settings, flags)
    for key in ("system", "prefill"):
        if values[key] is not None:
            check_text(values[key], "--" + key)
    log = output_file(Path(values["log"]).expanduser(), "--log") if values["log"] else None
    apply_threads(values["threads"])
    lm = load_model(folder, adapter=values["adapter"], device=values["device"], dtype=values["dtype"],
                    compile=values["compile"], lora_mode=check_lora_mode(values["lora_mode"]),
                    padded_attention=check_padded_mode(values["padded_attention"]),
                    quantize=check_quantize(values["quantize"]))
    if lm.tokenizer is None:
        raise ConfigError("this checkpoint has no tokenizer, so typed text cannot be encoded", where=str(folder),
                          fix="chat with a checkpoint that has tokenizer.json and a chat template")
    err = stderr()
    chat = Chat(lm, values["decoder"], options, {k: values[k] for k in GEN_SETTINGS}, system=values["system"],
                prefill=values["prefill"] or "", show=bool(flags.get("show")), log=log, err=err)
    interactive = stdin.isatty()
    err.print(f"[dim]evotok chat: {folder.name}, decoder {chat.decoder_name}; /help for commands, /quit to end[/dim]")
    failed = False
    while True:
        line = _read(stdin, interactive)
        if line is None:
            break
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not chat.command(line.strip()):
                    break
                continue
            out(chat.turn(line))
        except EvotokError as exc:  # one line, and the conversation goes on
            print(f"error: {exc.line()}", file=sys.stderr)
            failed = True
    return 2 if failed and not interactive else 0


def _read(stdin: TextIO, interactive: bool) -> str | None:
    """One line without its newline; None at end of input."""
    if interactive and stdin is sys.stdin:
        try:
            return input("> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")
