"""Exact-match accuracy survives a tokenizer that fails to decode one sample's answer.

The tokenizer is the tiny LLaMA's real one, subclassed only so that decoding a chosen id
raises, as ChatGLM's tokenizer used to for ids of its padded vocabulary (IndexError); here
the error is of a kind nobody anticipated, which must count as a miss too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from mlora_core.evaluation import accuracy
from mlora_core.evaluation.accuracy import answer_matches, exact_match_accuracy
from mlora_core.generation.decode import GenerationResult
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample


class FailsOnOneId(PreTrainedTokenizerFast):
    """The tokenizer, except that decoding ``bad_id`` raises."""

    bad_id = -1

    def _decode(self, token_ids: Any, *args: Any, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if self.bad_id in ids:
            raise RuntimeError(f"cannot decode id {self.bad_id}")
        return str(super()._decode(token_ids, *args, **kwargs))


@pytest.fixture
def tok(tiny_llama_dir: Path) -> FailsOnOneId:
    tokenizer = FailsOnOneId.from_pretrained(str(tiny_llama_dir))
    used = {i for word in ("yes", "no", "maybe", "question") for i in tokenizer.encode(word, add_special_tokens=False)}
    tokenizer.bad_id = next(i for i in range(len(tokenizer) - 1, 0, -1) if i not in used)
    return tokenizer


def words(tok: FailsOnOneId, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def test_a_decode_error_is_a_miss(tok):
    yes = words(tok, "yes")
    with pytest.raises(RuntimeError):
        tok.decode([*yes, tok.bad_id])
    assert answer_matches(tok, yes, yes)
    assert not answer_matches(tok, [*yes, tok.bad_id], yes)  # the generated answer fails
    assert not answer_matches(tok, yes, [*yes, tok.bad_id])  # the reference fails


def sample(tok: FailsOnOneId, answer: list[int]) -> Sample:
    prompt = words(tok, "question")
    ids = (*prompt, *answer, tok.eos_token_id)
    return Sample(input_ids=ids, labels=(IGNORE_INDEX,) * len(prompt) + ids[len(prompt) :])


def test_exact_match_accuracy_counts_an_undecodable_sample_as_a_miss(tok, monkeypatch):
    yes, no = words(tok, "yes"), words(tok, "no")
    sets = [("a", [sample(tok, yes), sample(tok, no), sample(tok, yes)]), ("b", [sample(tok, no)])]
    said = [yes, [*no, tok.bad_id], yes, no]  # a: hit, undecodable, hit; b: hit
    requests_seen = []

    def fake_generate(model, router, requests, *args, **kwargs):
        requests_seen.extend(requests)
        return [GenerationResult(token_ids=ids, finish_reason="eos") for ids in said]

    monkeypatch.setattr(accuracy, "generate", fake_generate)
    result = exact_match_accuracy(model=None, router=None, tokenizer=tok, sets=sets, pad_id=0)  # type: ignore[arg-type]
    assert result == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert [r.adapter for r in requests_seen] == ["a", "a", "a", "b"]
    assert all(r.prompt_ids == words(tok, "question") for r in requests_seen)
