"""Alpaca-style instruction data: JSON (a list) or JSONL records of instruction, input, output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX as IGNORE
from mlora_core.plugin_api.data import common_data_problems, split_held_out
from mlora_core.plugin_api.protocols import Sample, SplitDataset
from mlora_data.chat_template import CHAT, Message, require_chat_template, to_sample, tokenize_conversation
from mlora_data.records import read_items
from mlora_data.templates import TEMPLATES, PromptTemplate


class AlpacaLoader:
    """Reads alpaca records, applies a prompt template and tokenizes.

    Prompt tokens are masked from the loss (label -100) unless ``train_on_inputs``; the
    response ends with the tokenizer's EOS token; samples are cut to ``cutoff_len``.

    Template ``chat`` uses the tokenizer's chat template instead: the instruction (and the
    input, after a blank line) is one user message, the output the assistant's answer, which
    ends with whatever the template closes an assistant turn with (see
    :mod:`mlora_data.chat_template`).
    """

    def validate(self, config: DataConfig) -> list[str]:
        problems = common_data_problems(config, read_records)
        if config.template not in (*TEMPLATES, CHAT):
            known = ", ".join((*TEMPLATES, CHAT))
            problems.append(f"template: unknown template {config.template!r}; known: {known}")
        if config.options:
            problems.append(f"options: the alpaca loader takes no options, got {sorted(config.options)}")
        return problems

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        records = _read(Path(config.path))
        if config.template == CHAT:
            require_chat_template(tokenizer, config.path, "template chat")
            samples = [to_sample(*tokenize_conversation(chat_messages(r), tokenizer, at), config) for at, r in records]
        else:
            samples = [tokenize(r, TEMPLATES[config.template], tokenizer, config) for _, r in records]
        kept = [s for s in samples if s is not None]
        if not kept:
            raise DataError(
                f"{config.path}: no example has a response token left within cutoff_len {config.cutoff_len}"
            )
        return split_held_out(kept, config.val_set_size, seed)


def read_records(path: Path) -> list[dict[str, str]]:
    """Parse ``path`` (.json list or .jsonl); errors name the file and line or record."""
    return [record for _, record in _read(path)]


def _read(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(where, record) pairs; ``where`` names the file and line for later errors."""
    return [(where, _check_record(where, r)) for where, r in read_items(path)]


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


def chat_messages(record: dict[str, str]) -> list[Message]:
    """The record as a one-turn conversation: instruction (and input after a blank line) from
    the user, the output from the assistant."""
    question = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
