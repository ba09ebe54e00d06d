"""The tokenizer's own chat template (``tokenizer.apply_chat_template``) as a data template.

Qwen, Mistral, Gemma, Phi, Llama-3 and SmolLM2 instruct checkpoints ship a Jinja chat template
with their tokenizer. A conversation is rendered with it and tokenized once; what is learned
is every assistant turn: its content and whatever the template closes the turn with
(``<|im_end|>\\n``, ``<end_of_turn>\\n``, ``<|eot_id|>``, ``</s>``), so the model learns to stop.
Everything else (system and user turns, role headers, the generation prompt that opens an
assistant turn) is context.

Finding a turn's tokens works with any template that is *prefix-stable*: the conversation
up to assistant turn ``i`` is rendered with the generation prompt (where the turn starts)
and including turn ``i`` (where it ends), and both renderings, tokenized, must begin the
whole conversation's tokens. Templates that rewrite earlier turns (dropping past reasoning,
say) or whose tokenization merges across a turn boundary fail with a DataError saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample

#: The template name (``data.template``) meaning the tokenizer's chat template.
CHAT = "chat"

#: A message as the template receives it: ``{"role": ..., "content": ...}``.
Message = dict[str, str]


def require_chat_template(tokenizer: Any, where: str, what: str) -> None:
    """Raise DataError unless ``tokenizer`` ships a chat template; ``what`` names the setting."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: {what} renders with the tokenizer's chat template, but the tokenizer of "
            f"{_model_name(tokenizer)} has none (tokenizer.chat_template is unset); use an instruct "
            "or chat checkpoint that ships one, or data.type alpaca with template alpaca"
        )


def tokenize_conversation(messages: Sequence[Message], tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation as the chat template renders it, and which are learned.

    Messages after the last assistant turn are dropped (nothing after it is learned). When
    the last assistant turn's tokens hold no special token (a template without end-of-turn
    markers), the tokenizer's EOS token is appended and learned, so the model still learns
    to stop.

    Args:
        messages: the conversation; at least one message has role ``assistant``.
        where: names the record in errors (``file:line``).

    Returns:
        (input ids, learned flag per id), of equal length.

    Raises:
        DataError: the template refuses the conversation, or is not prefix-stable.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    messages = list(messages[: turns[-1] + 1])
    text = _render(tokenizer, messages, False, where)
    ids = _tokenize(tokenizer, text)
    learned = [False] * len(ids)
    start = end = 0
    for i in turns:
        start = _boundary(tokenizer, messages[:i], True, (text, ids), where)
        end = len(ids) if i == turns[-1] else _boundary(tokenizer, messages[: i + 1], False, (text, ids), where)
        if end <= start:
            raise DataError(
                f"{where}: the chat template of {_model_name(tokenizer)} renders messages[{i}] as no tokens"
            )
        learned[start:end] = [True] * (end - start)
    if not stop_token_ids(tokenizer) & set(ids[start:end]) and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
        learned.append(True)
    return ids, learned


def to_sample(ids: list[int], learned: list[bool], config: DataConfig) -> Sample | None:
    """The Sample (cut to ``cutoff_len``; everything learned when ``train_on_inputs``), or
    None when no learned token is left after the first position."""
    labels = [t if (keep or config.train_on_inputs) else IGNORE_INDEX for t, keep in zip(ids, learned, strict=True)]
    ids, labels = ids[: config.cutoff_len], labels[: config.cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Sample(tuple(ids), tuple(labels))


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Ids that can close an assistant turn: EOS and every special token except UNK."""
    ids = {t for t in getattr(tokenizer, "all_special_ids", ()) if t is not None}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {i for i, token in added.items() if getattr(token, "special", False)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids


def _boundary(
    tokenizer: Any, messages: list[Message], generation_prompt: bool, whole: tuple[str, list[int]], where: str
) -> int:
    """How many tokens of the whole conversation (its text and ids) ``messages`` cover,
    rendered alone; checks that their rendering and tokens begin the whole conversation's."""
    text, ids = whole
    prefix = _render(tokenizer, messages, generation_prompt, where)
    edge = f"before messages[{len(messages)}]" if generation_prompt else f"after messages[{len(messages) - 1}]"
    if not text.startswith(prefix):
        raise DataError(
            f"{where}: {edge}: the chat template of {_model_name(tokenizer)} is not prefix-stable: the conversation up "
            "to here renders differently once later messages follow (the template rewrites earlier turns), so "
            "the assistant turn's tokens cannot be located; training needs a template that renders each turn "
            "the same whatever follows it"
        )
    prefix_ids = _tokenize(tokenizer, prefix)
    if ids[: len(prefix_ids)] != prefix_ids:
        after = text[len(prefix) : len(prefix) + 12]
        raise DataError(
            f"{where}: {edge}: the chat template of {_model_name(tokenizer)} is not prefix-stable in tokens: "
            f"{prefix[-12:]!r} and {after!r} tokenize together across the turn boundary, so the assistant "
            "turn's tokens cannot be located (a generation prompt ending in a space does this; let the "
            "template put the space before the assistant's content instead)"
        )
    return len(prefix_ids)


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool, where: str) -> str:
    """The conversation as the chat template writes it."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as exc:
        raise DataError(
            f"{where}: the chat template of {_model_name(tokenizer)} refused the conversation: {exc}"
        ) from None
    return str(text)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Tokenize without extra special tokens: the template writes BOS where the family wants one."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"
