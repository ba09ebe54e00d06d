"""Chat data: JSON (a list) or JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}``.

The conversational format TRL and most chat data sets use, rendered with the tokenizer's own
chat template (see :mod:`mlora_data.chat_template`); the assistant turns are learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.data import common_data_problems, split_held_out
from mlora_core.plugin_api.protocols import SplitDataset
from mlora_data.chat_template import CHAT, Message, require_chat_template, to_sample, tokenize_conversation
from mlora_data.records import read_items

#: The roles a message may have.
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One record: where it is in its file (for errors) and its messages."""

    where: str
    messages: tuple[Message, ...]

    @property
    def assistant_turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


class ChatLoader:
    """Reads chat records and tokenizes them with the tokenizer's chat template.

    Only the assistant turns are learned (their content and the tokens the template closes
    each with); system and user turns and the template's scaffolding get label -100, unless
    ``train_on_inputs``. The template is always the tokenizer's: ``data.template`` is ``chat``
    or left at the schema default. Samples are cut to ``cutoff_len``.
    """

    def validate(self, config: DataConfig) -> list[str]:
        read: list[Conversation] = []

        def read_file(path: Path) -> list[Conversation]:
            read[:] = read_conversations(path)  # kept for the exact_match check
            return read

        problems = common_data_problems(config, read_file)
        if config.template not in (CHAT, DataConfig.template):
            problems.append(
                f"template: the chat loader renders with the tokenizer's chat template: write template: {CHAT} "
                f"or leave template out (got {config.template!r})"
            )
        if config.options:
            problems.append(f"options: the chat loader takes no options, got {sorted(config.options)}")
        if config.exact_match and read:
            problems += [f"exact_match: {p}" for p in _exact_match_problems(read)]
        return problems

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        conversations = read_conversations(Path(config.path))
        if config.exact_match and (problems := _exact_match_problems(conversations)):
            raise DataError(f"data.exact_match: {problems[0]}")
        require_chat_template(tokenizer, config.path, "data.type chat")
        samples = [to_sample(*tokenize_conversation(c.messages, tokenizer, c.where), config) for c in conversations]
        kept = [s for s in samples if s is not None]
        if not kept:
            raise DataError(
                f"{config.path}: no conversation has an assistant token left within cutoff_len {config.cutoff_len}"
            )
        return split_held_out(kept, config.val_set_size, seed)


def read_conversations(path: Path) -> list[Conversation]:
    """Parse ``path`` (.json list or .jsonl); errors name the file and line or record."""
    return [_check_record(where, record) for where, record in read_items(path)]


def _check_record(where: str, record: Any) -> Conversation:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: expected an object with 'messages', a list of {{role, content}} objects")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked = tuple(_check_message(f"{where}: messages[{i}]", m) for i, m in enumerate(messages))
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: no assistant turn (nothing to learn)")
    return Conversation(where, checked)


def _check_message(where: str, message: Any) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in message:
            raise DataError(f"{where}: missing {key!r}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _exact_match_problems(conversations: list[Conversation]) -> list[str]:
    """exact_match checks one answer per conversation: refuse multi-turn conversations."""
    for c in conversations:
        if c.assistant_turns > 1:
            return [
                f"{c.where} has {c.assistant_turns} assistant turns; exact-match accuracy checks one answer "
                "per conversation (the learned tokens after the prompt), so it needs conversations with one "
                "assistant turn; turn exact_match off or split the conversation"
            ]
    return []
