"""Preference data: JSON (a list) or JSONL records ``{"prompt", "chosen", "rejected"}``, optional ``system``.

The format TRL and most preference sets (for DPO, CPO, ORPO) use, with text fields. Each
record becomes one :class:`~mlora_core.plugin_api.protocols.Sample` of two sequences, the
prompt with the chosen completion, then the prompt with the rejected one
(``starts=(len(chosen sequence),)``); the completions are learned, the prompt is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.data import common_data_problems, split_held_out
from mlora_core.plugin_api.protocols import Sample, SplitDataset
from mlora_data.chat_template import CHAT, Message, require_chat_template, to_sample, tokenize_conversation
from mlora_data.records import read_items
from mlora_data.templates import TEMPLATES

#: The template name (``data.template``) for the prompt text as it is.
NONE = "none"

#: The text fields every record has.
FIELDS = ("prompt", "chosen", "rejected")

#: One tokenized sequence: its ids and, per id, whether it is learned.
Tokens = tuple[list[int], list[bool]]


@dataclass(frozen=True)
class Pair:
    """One record: where it is in its file (for errors), its texts, and its system prompt ("": none)."""

    where: str
    prompt: str
    chosen: str
    rejected: str
    system: str = ""


class PreferenceLoader:
    """Reads preference pairs and tokenizes each as a two-sequence sample, chosen first.

    Templates: ``alpaca`` (and any other prompt template of :data:`~mlora_data.templates.TEMPLATES`)
    turns the prompt into the template's prompt without input; ``none`` uses the prompt text as
    it is. With both, the system prompt (if any) comes first, then a blank line; the prompt is
    tokenized once (with the tokenizer's special tokens) and begins both sequences; each
    completion is tokenized without special tokens and ends with EOS. ``chat`` renders
    system, user (the prompt) and assistant (the completion) turns with the tokenizer's chat
    template and learns the assistant turn as the chat loader does.

    Each sequence is cut to ``cutoff_len`` separately; a record is dropped when either
    sequence has no learned token left, or when the two are the same after the cut.
    """

    #: Each sample is a pair (chosen, rejected): config validation checks that the job's
    #: objective trains on pairs.
    sequences_per_sample = 2

    def validate(self, config: DataConfig) -> list[str]:
        problems = common_data_problems(config, read_pairs)
        if config.template not in templates():
            problems.append(f"template: unknown template {config.template!r}; known: {', '.join(templates())}")
        return problems + setting_problems(config)

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        if problems := setting_problems(config):
            raise DataError(f"data.{problems[0]}")
        pairs = read_pairs(Path(config.path))
        if config.template == CHAT:
            require_chat_template(tokenizer, config.path, "template chat")
        samples = [pair_sample(p, tokenize_pair(p, config.template, tokenizer), config) for p in pairs]
        kept = [s for s in samples if s is not None]
        if not kept:
            raise DataError(
                f"{config.path}: no pair has a learned token left in both sequences within cutoff_len "
                f"{config.cutoff_len} (or every pair's sequences are the same after the cut)"
            )
        return split_held_out(kept, config.val_set_size, seed)


def templates() -> tuple[str, ...]:
    """The templates preference data takes."""
    return (*TEMPLATES, NONE, CHAT)


def setting_problems(config: DataConfig) -> list[str]:
    """Settings that make no sense for preference data (one line each)."""
    problems = []
    if config.exact_match:
        problems.append(
            "exact_match: preference pairs have no single answer to check (a chosen and a rejected "
            "completion); turn exact_match off"
        )
    if config.train_on_inputs:
        problems.append(
            "train_on_inputs: preference pairs learn their completions only (the prompt both sequences "
            "share would cancel out of the preference); leave train_on_inputs false"
        )
    if config.options:
        problems.append(f"options: the preference loader takes no options, got {sorted(config.options)}")
    return problems


def read_pairs(path: Path) -> list[Pair]:
    """Parse ``path`` (.json list or .jsonl); errors name the file and line or record."""
    return [_check_record(where, record) for where, record in read_items(path)]


def _check_record(where: str, record: Any) -> Pair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with prompt, chosen, rejected (and optionally system)")
    for key in FIELDS:
        if key not in record:
            raise DataError(f"{where}: missing {key!r}")
        if not isinstance(record[key], str):
            hint = " (lists of messages are not read: write the texts, and use template chat)"
            raise DataError(
                f"{where}: {key!r} must be a string, got {type(record[key]).__name__}"
                + (hint if isinstance(record[key], list) else "")
            )
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string or null, got {type(system).__name__}")
    if record["chosen"] == record["rejected"]:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' are the same text, a pair that teaches no preference; "
            "fix or drop the record"
        )
    return Pair(where, record["prompt"], record["chosen"], record["rejected"], system or "")


def tokenize_pair(pair: Pair, template: str, tokenizer: Any) -> tuple[Tokens, Tokens]:
    """The chosen and the rejected sequence, uncut: (ids, learned flags) each."""
    if template == CHAT:
        return _chat_tokens(pair, pair.chosen, tokenizer), _chat_tokens(pair, pair.rejected, tokenizer)
    text = pair.prompt if template == NONE else TEMPLATES[template].prompt(pair.prompt)
    if pair.system:
        text = f"{pair.system}\n\n{text}"
    prompt_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])  # once, for both

    def sequence(completion: str) -> Tokens:
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        completion_ids.append(int(tokenizer.eos_token_id))
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)

    return sequence(pair.chosen), sequence(pair.rejected)


def _chat_tokens(pair: Pair, completion: str, tokenizer: Any) -> Tokens:
    messages: list[Message] = [{"role": "system", "content": pair.system}] if pair.system else []
    messages += [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": completion}]
    return tokenize_conversation(messages, tokenizer, pair.where)


def pair_sample(pair: Pair, sequences: tuple[Tokens, Tokens], config: DataConfig) -> Sample | None:
    """The two-sequence Sample, each sequence cut to ``cutoff_len``; None when either has no
    learned token left or the two are the same after the cut.

    Raises:
        DataError: the two sequences do not begin with the same prompt tokens (a chat template
            that renders the prompt differently depending on the completion).
    """
    (chosen_ids, chosen_learned), (rejected_ids, rejected_learned) = sequences
    start = chosen_learned.index(True)
    if rejected_learned.index(True) != start or chosen_ids[:start] != rejected_ids[:start]:
        raise DataError(
            f"{pair.where}: the prompt tokens differ between the chosen and the rejected sequence (the template "
            "renders the prompt differently depending on the completion); both must begin with the same prompt"
        )
    chosen = to_sample(chosen_ids, chosen_learned, config)
    rejected = to_sample(rejected_ids, rejected_learned, config)
    if chosen is None or rejected is None or chosen == rejected:
        return None
    return Sample(
        chosen.input_ids + rejected.input_ids, chosen.labels + rejected.labels, starts=(len(chosen.input_ids),)
    )
