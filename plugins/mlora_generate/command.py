"""``mlora generate``: load the base once with any number of saved adapters, and generate for many prompts.

Prompts come from ``--prompt`` (each run with every ``--prompt-adapter``) and from a JSONL
file (``{"prompt": ..., "adapter": name or null}``, or ``instruction``/``input`` with
``--template alpaca``). Results go out as JSONL, in input order. Everything a user can get
wrong (files, adapter names, JSON lines) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_core.errors import ConfigError, MloraError
from mlora_core.models.saved_adapters import load_adapter
from mlora_core.plugin_api.conventions import JOB_NAME, JOB_NAME_RULE, device_problems, pad_token_id
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import PromptTemplate
from mlora_core.plugin_api.routing import RowRouter

#: ``--prompt-adapter`` value for the bare base model (JSONL lines use null).
BASE = "base"


@dataclass
class Prompt:
    """One line of work: the text the model sees and the adapter (None: the bare base)."""

    text: str
    adapter: str | None


class GenerateCommand:
    help = "generate text with saved adapters, many adapters per batch over one base"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        return main(args, host)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: HF directory, .gguf file or pkg:DIST/FILE")
    p.add_argument("--backend", help="backend name (default: detected from the checkpoint)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="base dtype (default fp32)")
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), help="quantize the base with bitsandbytes")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a saved adapter (repeatable)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument(
        "--prompt-adapter",
        action="append",
        metavar="NAME",
        help=f"run every --prompt with this adapter ({BASE!r}: the bare base; repeatable; default: every adapter)",
    )
    p.add_argument("--prompts", type=Path, metavar="FILE.jsonl", help="prompts with their adapters, one JSON a line")
    p.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write results here (default: stdout)")
    p.add_argument("--template", default="none", help="prompt template: none (raw text) or a registered one (alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: every prompt in one batch)")


def main(args: argparse.Namespace, host: PluginHost) -> int:
    """Run ``mlora generate``; returns the exit status (errors raise MloraError)."""
    from mlora_core.generation.decode import GenerationRequest, GenerationSettings, generate, stop_token_ids

    settings = GenerationSettings(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)
    adapters = parse_adapters(args.adapter)
    template = _template(host, args.template)
    prompts = _prompts(args, adapters, template)
    problems = settings.problems() + (["batch_size must be at least 1"] if (args.batch_size or 1) < 1 else [])
    if problems:
        raise MloraError("; ".join(problems))
    loaded, router = load_with_adapters(host, args, adapters)
    tokenizer = loaded.tokenizer
    requests = [GenerationRequest(tokenizer(p.text, add_special_tokens=True)["input_ids"], p.adapter) for p in prompts]
    results = generate(
        loaded.model, router, requests, settings, stop_token_ids(loaded.model, tokenizer), pad_token_id(tokenizer),
        args.batch_size, _progress,
    )  # fmt: skip
    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
        for prompt, result in zip(prompts, results, strict=True):
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            line = {"prompt": prompt.text, "adapter": prompt.adapter, "output": text}
            line |= {"finish_reason": result.finish_reason, "new_tokens": len(result.token_ids)}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def load_with_adapters(host: PluginHost, args: argparse.Namespace, adapters: dict[str, Path]) -> tuple[Any, RowRouter]:
    """The base model (loaded once, quantized if asked) with every adapter attached; and their router."""
    from mlora_core.config.schema import BaseModelConfig
    from mlora_core.config.validation import resolve_backend
    from mlora_core.models.loading import load_base_model

    config = BaseModelConfig(
        backend=args.backend, path=args.base, dtype=args.dtype, quantize=args.quantize, device=args.device
    )
    try:
        backend = resolve_backend(config, host)
    except ConfigError as exc:  # its problems name config keys; say --base instead
        raise MloraError("--base: " + "; ".join(p.removeprefix("base_model.path: ") for p in exc.problems)) from None
    problems = host.backends.create(backend).validate(config) + device_problems(config.device)
    if problems:
        raise MloraError(f"--base {args.base}: " + "; ".join(problems))
    loaded = load_base_model(host, config)
    router = RowRouter()
    for name, directory in adapters.items():
        load_adapter(host, loaded.model, name, directory, router)
    return loaded, router


def parse_adapters(items: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` items -> {name: dir}; the directories must exist."""
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not JOB_NAME.match(name) or not directory:
            raise MloraError(f"--adapter {item!r}: expected NAME=DIR (NAME of {JOB_NAME_RULE})")
        if name == BASE or name in adapters:
            raise MloraError(f"--adapter {item!r}: the name {name!r} is reserved or used twice")
        if not Path(directory).is_dir():
            raise MloraError(f"--adapter {item!r}: {directory} is not a directory")
        adapters[name] = Path(directory)
    return adapters


def _prompts(args: argparse.Namespace, adapters: dict[str, Path], template: Any) -> list[Prompt]:
    """The --prompt prompts (each with each --prompt-adapter), then the file's, in order."""
    names = args.prompt_adapter or list(adapters) or [BASE]
    for name in names:
        if name != BASE and name not in adapters:
            raise MloraError(f"--prompt-adapter {name!r}: no such --adapter; known: {', '.join([BASE, *adapters])}")
    prompts = [
        Prompt(_templated(template, text, ""), None if name == BASE else name) for text in args.prompt for name in names
    ]
    if args.prompts is not None:
        prompts += read_prompts(args.prompts, adapters, template)
    if not prompts:
        raise MloraError("nothing to generate: give --prompt or --prompts")
    if args.out is not None and not args.out.parent.is_dir():
        raise MloraError(f"--out {args.out}: no directory {args.out.parent}")
    return prompts


def read_prompts(path: Path, adapters: dict[str, Path], template: Any) -> list[Prompt]:
    """Parse a prompts JSONL file; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MloraError(f"--prompts: cannot read {path}: {exc}") from None
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_prompt_line(line, f"{path}:{lineno}", adapters, template))
    return prompts


def _prompt_line(line: str, where: str, adapters: dict[str, Path], template: Any) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MloraError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MloraError(f"{where}: expected a JSON object")
    adapter = record.get("adapter")
    if adapter is not None and adapter not in adapters:
        raise MloraError(f"{where}: unknown adapter {adapter!r}; known: {', '.join(adapters) or '(none)'} or null")
    if template is not None and isinstance(record.get("instruction"), str):
        text, extra = record["instruction"], record.get("input", "")
    else:
        text, extra = record.get("prompt"), ""
    if not isinstance(text, str) or not text or not isinstance(extra, str):
        needs = "'prompt' or 'instruction' (and 'input')" if template is not None else "'prompt'"
        raise MloraError(f"{where}: needs a non-empty string {needs}")
    return Prompt(_templated(template, text, extra), adapter)


def _template(host: PluginHost, name: str) -> PromptTemplate | None:
    """The prompt template named ``name`` (None for ``none``), from the templates plugins register."""
    if name == "none":
        return None
    if name not in host.templates:
        raise MloraError(f"--template {name!r}: unknown; known: none, {', '.join(host.templates)}")
    return host.templates.create(name)


def _templated(template: PromptTemplate | None, instruction: str, input_text: str) -> str:
    return instruction if template is None else template.prompt(instruction, input_text)


def _progress(done: int, total: int) -> None:
    print(f"mlora generate: {done}/{total} prompts", file=sys.stderr, flush=True)
