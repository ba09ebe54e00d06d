"""Alpaca-style instruction data: JSON (a list) or JSONL records of instruction, input, output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX as IGNORE
from mlora_core.plugin_api.data import common_data_problems, split_held_out
from mlora_core.plugin_api.protocols import Sample, SplitDataset
from mlora_data.templates import TEMPLATES, PromptTemplate


class AlpacaLoader:
    """Reads alpaca records, applies a prompt template and tokenizes.

    Prompt tokens are masked from the loss (label -100) unless ``train_on_inputs``; the
    response ends with the tokenizer's EOS token; samples are cut to ``cutoff_len``.
    """

    def validate(self, config: DataConfig) -> list[str]:
        problems = common_data_problems(config, read_records)
        if config.template not in TEMPLATES:
            problems.append(f"template: unknown template {config.template!r}; known: {', '.join(TEMPLATES)}")
        if config.options:
            problems.append(f"options: the alpaca loader takes no options, got {sorted(config.options)}")
        return problems

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        records = read_records(Path(config.path))
        template = TEMPLATES[config.template]
        samples = [tokenize(r, template, tokenizer, config) for r in records]
        kept = [s for s in samples if s is not None]
        if not kept:
            raise DataError(
                f"{config.path}: no example has a response token left within cutoff_len {config.cutoff_len}"
            )
        return split_held_out(kept, config.val_set_size, seed)


def read_records(path: Path) -> list[dict[str, str]]:
    """Parse ``path`` (.json list or .jsonl); errors name the file and line or record."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                items.append((f"{path}:{lineno}", _parse(line, f"{path}:{lineno}")))
    else:
        data = _parse(text, str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or use a .jsonl file)")
        items = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    if not items:
        raise DataError(f"{path}: no records")
    return [_check_record(where, r) for where, r in items]


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None


def _check_record(where: str, record: Any) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction, input, output")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: missing or non-string {key!r}")
    if not isinstance(record.get("input", ""), str):
        raise DataError(f"{where}: 'input' must be a string")
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]}


def tokenize(record: dict[str, str], template: PromptTemplate, tokenizer: Any, config: DataConfig) -> Sample | None:
    """One record -> a Sample, or None when no learned token survives the cut."""
    prompt = template.prompt(record["instruction"], record["input"])
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[: config.cutoff_len]
    prompt_labels = list(prompt_ids) if config.train_on_inputs else [IGNORE] * len(prompt_ids)
    labels = (prompt_labels + response_ids)[: config.cutoff_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Sample(tuple(ids), tuple(labels))
