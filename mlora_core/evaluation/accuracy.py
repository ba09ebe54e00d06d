"""Exact-match accuracy of greedy answers on held-out samples, several adapters per batch.

A held-out :class:`~mlora_core.plugin_api.protocols.Sample` carries its own question and answer: the
unlearned prefix (label -100) is the prompt, the learned rest (up to EOS) the answer. The
greedy answer matches when both decode to the same text after stripping whitespace. A sample
whose answer (generated or reference) the tokenizer fails to decode counts as a miss: one
sample never ends the evaluation, or the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from mlora_core.generation.decode import GenerationRequest, GenerationSettings, generate, stop_token_ids
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import RowRouter

#: Tokens a greedy answer may run past the reference answer's length before it is cut.
EXTRA_TOKENS = 8


def question_and_answer(sample: Sample, eos_id: int | None) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids without EOS); the prompt ends where learning starts."""
    start = next(i for i, label in enumerate(sample.labels) if i > 0 and label != IGNORE_INDEX)
    answer = list(sample.input_ids[start:])
    if answer and answer[-1] == eos_id:
        answer.pop()
    return list(sample.input_ids[:start]), answer


def exact_match_accuracy(
    model: nn.Module,
    router: RowRouter,
    tokenizer: Any,
    sets: Sequence[tuple[str, Sequence[Sample]]],
    pad_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Fraction of each adapter's samples whose greedy answer equals the reference answer.

    Args:
        sets: (adapter name, held-out samples) per job; the adapters must be attached.
    """
    eos_id = tokenizer.eos_token_id
    requests, references, owners = [], [], []
    for name, samples in sets:
        for sample in samples:
            prompt, answer = question_and_answer(sample, eos_id)
            requests.append(GenerationRequest(prompt, name))
            references.append(answer)
            owners.append(name)
    if not requests:
        return {}
    longest = max(len(a) for a in references)
    settings = GenerationSettings(max_new_tokens=longest + EXTRA_TOKENS)
    stop = stop_token_ids(model, tokenizer)
    results = generate(model, router, requests, settings, stop, pad_id, batch_size=batch_size)
    hits: dict[str, list[bool]] = {name: [] for name, _ in sets}
    for owner, result, answer in zip(owners, results, references, strict=True):
        hits[owner].append(answer_matches(tokenizer, result.token_ids, answer))
    return {name: sum(h) / len(h) for name, h in hits.items() if h}


def answer_matches(tokenizer: Any, said: Sequence[int], answer: Sequence[int]) -> bool:
    """Whether the generated ids ``said`` decode to the reference ``answer``'s text (whitespace stripped).

    A model may generate ids its tokenizer cannot decode (ChatGLM's vocabulary is padded past
    its tokenizer's: 65,024 rows for about 64,800 tokens), and a tokenizer may fail on other
    input in its own ways. Whatever ``decode`` raises for either side, the answer is wrong, not
    an error.
    """
    said_text, answer_text = decoded(tokenizer, said), decoded(tokenizer, answer)
    return said_text is not None and answer_text is not None and said_text.strip() == answer_text.strip()


def decoded(tokenizer: Any, ids: Sequence[int]) -> str | None:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, or None when it raises or returns no string."""
    try:
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
    except Exception:  # any failure of one sample's decoding is that sample's miss
        return None
    return text if isinstance(text, str) else None
