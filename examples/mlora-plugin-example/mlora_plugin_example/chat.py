"""``chat_markup``: chat-format JSONL, one conversation per line, learning the assistant's turns.

Each line is ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
with at least one assistant message. Each message is rendered with the config's ``template``
(``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; ``plain``: ``{role}: {content}\\n``).
Only assistant contents (each followed by the tokenizer's EOS token) are learned, unless
``train_on_inputs``; samples are cut to ``cutoff_len``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX as IGNORE
from mlora_core.plugin_api.data import common_data_problems, split_held_out
from mlora_core.plugin_api.protocols import Sample, SplitDataset

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """How one message is rendered: ``header`` (never learned), content, ``footer``."""

    header: str
    footer: str


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(header="<|im_start|>{role}\n", footer="<|im_end|>\n"),
    "plain": ChatTemplate(header="{role}: ", footer="\n"),
}


class ChatLoader:
    """Reads chat JSONL (``messages`` lists), renders with a chat template and tokenizes."""

    def validate(self, config: DataConfig) -> list[str]:
        problems = common_data_problems(config, read_conversations)
        if config.template not in TEMPLATES:
            problems.append(f"template: unknown chat template {config.template!r}; known: {', '.join(TEMPLATES)}")
        if config.options:
            problems.append(f"options: the chat_markup loader takes no options, got {sorted(config.options)}")
        return problems

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        conversations = read_conversations(Path(config.path))
        template = TEMPLATES[config.template]
        samples = [tokenize(messages, template, tokenizer, config) for messages in conversations]
        kept = [s for s in samples if s is not None]
        if not kept:
            raise DataError(f"{config.path}: no conversation has an assistant token left within cutoff_len")
        return split_held_out(kept, config.val_set_size, seed)


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Parse a chat JSONL file; errors name the file and line."""
    conversations = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            conversations.append(_check(f"{path}:{lineno}", line))
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def _check(where: str, line: str) -> list[dict[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and a string content")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise DataError(f"{where}: no assistant message to learn")
    return [{"role": msg["role"], "content": msg["content"]} for msg in messages]


def render(messages: list[dict[str, str]], template: ChatTemplate) -> str:
    """A conversation as the text the model reads (before tokenization and EOS tokens)."""
    return "".join(template.header.format(role=m["role"]) + m["content"] + template.footer for m in messages)


def tokenize(
    messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Any, config: DataConfig
) -> Sample | None:
    """One conversation -> a Sample, or None when no learned token survives the cut."""
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        header = tokenizer(template.header.format(role=msg["role"]), add_special_tokens=i == 0)["input_ids"]
        body = tokenizer(msg["content"], add_special_tokens=False)["input_ids"]
        footer = tokenizer(template.footer, add_special_tokens=False)["input_ids"]
        learned = msg["role"] == "assistant" or config.train_on_inputs
        if msg["role"] == "assistant":
            body = body + [tokenizer.eos_token_id]
        ids += header + body + footer
        labels += header if config.train_on_inputs else [IGNORE] * len(header)
        labels += body if learned else [IGNORE] * len(body)
        labels += footer if config.train_on_inputs else [IGNORE] * len(footer)
    ids, labels = ids[: config.cutoff_len], labels[: config.cutoff_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Sample(tuple(ids), tuple(labels))
