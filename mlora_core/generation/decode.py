"""Batched text generation with several adapters at once over the one shared base.

One batch holds rows for several adapters (and bare-base rows), grouped so that one
``router.route([Segment(adapter, start, stop), ...])`` covers it; the decode loop keeps the
same rows in every forward, so the routing stays valid for the KV cache. Prompts are
left-padded, so every row's next token is read from the last column.

Models whose ``forward`` takes a cache (transformers' ``cache``, or ``past_key_values`` in
older releases) decode with it: the prompt once, then one token per forward. Models without
one (the native ChatGLM2/3 model) recompute the whole sequence for each new token: the same
tokens, only slower (quadratic in the length).

Used by ``mlora generate`` (saved adapters) and callable by the engine with adapters that are
attached in memory::

    results = generate(model, router, [GenerationRequest(ids, "sql"), GenerationRequest(ids, None)],
                       GenerationSettings(max_new_tokens=32), eos_token_ids={2}, pad_id=0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Literal

import torch
from torch import nn

from mlora_core.errors import MloraError
from mlora_core.plugin_api.routing import RowRouter, Segment

FinishReason = Literal["eos", "length"]
#: progress(requests done, requests in all), called after each batch.
Progress = Callable[[int, int], None]


@dataclass
class GenerationSettings:
    """How to pick tokens. Greedy unless ``do_sample``; ``temperature`` and ``top_p`` apply to sampling."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    #: Request i samples from its own generator seeded ``seed + i``: its output does not depend
    #: on the batch size or the other requests (up to float rounding of the batched forward).
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            out.append("temperature must be positive")
        if not 0 < self.top_p <= 1:
            out.append("top_p must be in (0, 1]")
        return out


@dataclass
class GenerationRequest:
    """One prompt (token ids, non-empty) and the adapter to generate with (None: the bare base)."""

    prompt_ids: list[int]
    adapter: str | None = None


@dataclass
class GenerationResult:
    """The new tokens, without the EOS token; ``finish_reason`` says whether EOS or the length limit ended them."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "length"


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS token and the model's generation-config EOS tokens (chat models
    list their end-of-turn token there: Gemma's ``<end_of_turn>``, Qwen's ``<|im_end|>``)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return ids


def generate(
    model: nn.Module,
    router: RowRouter,
    requests: Sequence[GenerationRequest],
    settings: GenerationSettings,
    eos_token_ids: Collection[int],
    pad_id: int,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> list[GenerationResult]:
    """Generate for every request, several adapters per batch; results come in request order.

    Args:
        model: the base with its adapters attached; ``model(input_ids=(B, T), attention_mask=(B, T))``
            returns ``logits`` (B, T, V).
        router: the router the adapters were attached with.
        eos_token_ids: tokens that end a row (not included in its result).
        pad_id: the token used for left padding.
        batch_size: rows per forward (None: all requests in one batch).
        progress: called after each batch with (done, total).

    The model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored after.
    """
    problems = settings.problems() + [f"request {i}: empty prompt" for i, r in enumerate(requests) if not r.prompt_ids]
    if batch_size is not None and batch_size < 1:
        problems.append("batch_size must be at least 1")
    if problems:
        raise MloraError("cannot generate: " + "; ".join(problems))
    results: dict[int, GenerationResult] = {}
    eos = set(eos_token_ids)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for rows in generation_batches(requests, batch_size):
                batch = [requests[i] for i in rows]
                results.update(
                    zip(rows, _generate_batch(model, router, batch, rows, settings, eos, pad_id), strict=True)
                )
                if progress is not None:
                    progress(len(results), len(requests))
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(requests))]


def generation_batches(requests: Sequence[GenerationRequest], batch_size: int | None) -> list[list[int]]:
    """Request indices per batch: longest prompts first (less padding), each batch grouped by adapter.

    Adapters keep the order in which they first appear in ``requests``, so each batch's rows
    form one contiguous segment per adapter.
    """
    first_seen: dict[str | None, int] = {}
    for r in requests:
        first_seen.setdefault(r.adapter, len(first_seen))
    by_length = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
    size = batch_size or max(len(requests), 1)
    chunks = [by_length[i : i + size] for i in range(0, len(by_length), size)]
    return [sorted(chunk, key=lambda i: first_seen[requests[i].adapter]) for chunk in chunks]


def segments_of(batch: Sequence[GenerationRequest]) -> list[Segment]:
    """One segment per run of rows with the same adapter (rows must be grouped by adapter)."""
    segments, start = [], 0
    for adapter, group in groupby(r.adapter for r in batch):
        stop = start + len(list(group))
        segments.append(Segment(adapter, start, stop))
        start = stop
    return segments


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), prompts right-aligned, 1 = token."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def _generate_batch(
    model: nn.Module,
    router: RowRouter,
    batch: Sequence[GenerationRequest],
    indices: Sequence[int],
    settings: GenerationSettings,
    eos: set[int],
    pad_id: int,
) -> list[GenerationResult]:
    """Decode one batch (rows grouped by adapter) until every row has hit EOS or the length limit."""
    device = _device_of(model)
    ids, mask = (t.to(device) for t in left_pad([r.prompt_ids for r in batch], pad_id))
    pick = _sampler(settings, indices) if settings.do_sample else _greedy
    decoder = _Decoder(model, ids, mask)
    results = [GenerationResult() for _ in batch]
    finished = [False] * len(batch)
    with router.route(segments_of(batch)):
        logits = decoder.first()  # (B, V)
        for step in range(settings.max_new_tokens):
            tokens = pick(logits).tolist()  # (B,)
            for row, token in enumerate(tokens):
                if finished[row]:
                    continue
                if token in eos:
                    finished[row] = True
                    results[row].finish_reason = "eos"
                else:
                    results[row].token_ids.append(token)
            if all(finished) or step + 1 == settings.max_new_tokens:
                break
            fed = [pad_id if f else t for f, t in zip(finished, tokens, strict=True)]  # finished rows are fed pads
            logits = decoder.next(torch.tensor(fed, dtype=torch.long, device=device))
    return results


class _Decoder:
    """Runs the model over a growing left-padded batch, with a KV cache when the model has one."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.model, self.ids, self.mask = model, ids, mask  # (B, T), (B, T)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.takes_positions = "position_ids" in params
        self.keeps_last = "logits_to_keep" in params
        self.cache: Any = None

    def first(self) -> torch.Tensor:
        """Logits of the prompt's last column: (B, V) fp32."""
        return self._forward(self.ids, self._positions())

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) and return the logits for the following position: (B, V) fp32."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)  # (B, T + 1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.cache_arg is None:  # no cache: run the whole sequence again
            return self._forward(self.ids, self._positions())
        return self._forward(self.ids[:, -1:], self._positions()[:, -1:])

    def _positions(self) -> torch.Tensor:
        """Each token's position within its own row, pads at 0 (as transformers' generate does): (B, T)."""
        return (self.mask.cumsum(dim=-1) - 1).clamp(min=0)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": self.mask}
        if self.takes_positions:
            kwargs["position_ids"] = positions
        if self.keeps_last:
            kwargs["logits_to_keep"] = 1
        if self.cache_arg is not None:
            kwargs["use_cache"] = True
            if self.cache is not None:
                kwargs[self.cache_arg] = self.cache
        out = self.model(**kwargs)
        if self.cache_arg is not None:
            self.cache = out.get("cache") or out.get("past_key_values")
            if self.cache is None:
                raise MloraError(f"{type(self.model).__name__} returned no KV cache although it accepts one")
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits.float()


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the most likely token (the lowest id on ties, like ``torch.argmax``)."""
    return logits.argmax(dim=-1)


def _sampler(settings: GenerationSettings, indices: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Temperature, then nucleus (top-p) sampling; row k draws from request ``indices[k]``'s generator."""
    generators = [torch.Generator().manual_seed(settings.seed + i) for i in indices]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.cpu() / settings.temperature, dim=-1)  # (B, V)
        if settings.top_p < 1:
            probs = _top_p(probs, settings.top_p)
        rows = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
        return torch.cat(rows).to(logits.device)

    return pick


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose mass reaches ``top_p`` (at least one): (B, V) -> (B, V)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _device_of(model: nn.Module) -> torch.device:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        weight = getattr(get_embeddings(), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    return next(model.parameters()).device
