"""ChatGLM2/3 tokenizers without THUDM's remote code.

THUDM ship their tokenizer class as code inside the checkpoint, which mlora never runs.
Instead, :func:`load_tokenizer` reads ``tokenizer.json`` when the checkpoint has one (a
standard fast tokenizer), and otherwise the sentencepiece ``tokenizer.model`` through
:class:`ChatGLMTokenizer`, written here to behave as THUDM's:

- ids below the sentencepiece vocabulary size are sentencepiece's; the special tokens
  ``[MASK] [gMASK] [sMASK] sop eop`` (ChatGLM2) and ``<|system|> <|user|> <|assistant|>
  <|observation|>`` (ChatGLM3) follow, in that order;
- ``add_special_tokens=True`` puts ``[gMASK] sop`` in front of the text (a pair of texts
  gets ``[gMASK] sop A B </s>``);
- EOS is ``</s>``, padding is ``<unk>`` (id 0), as in THUDM's tokenizer;
- text is encoded literally: ``<|user|>`` written in a string is not the special token
  (THUDM's default, ``encode_special_tokens=False``). Pass ``encode_special_tokens=True``
  to turn the four role markers in text into their tokens. ``</s>``, ``<unk>`` and ``<s>``
  written in a string are text too, always: THUDM's tokenizer hands the whole string to
  sentencepiece, which never matches its control or unknown pieces in text (transformers'
  base class would split them out as the EOS and unknown tokens);
- decoding keeps the space a piece such as ``▁h`` stands for after a special token
  (``[gMASK] sop ▁h`` is ``[gMASK]sop h``), as sentencepiece does after a user-defined
  symbol: only the text's first piece loses its leading ``▁`` (the dummy prefix);
- an id past the vocabulary (the model's embedding is padded: 65024 rows for 64798 ids,
  pieces and special tokens, in the 6B models) or below 0 decodes as nothing, as in THUDM's ``convert_id_to_token``.

Prompt formats: :func:`chatglm2_prompt` builds ChatGLM2's text prompt
(``[Round 1]\\n\\n问：...\\n\\n答：``) and :meth:`ChatGLMTokenizer.build_chat_input` builds
ChatGLM3's token prompt (``[gMASK] sop <|user|> \\n query <|assistant|>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from mlora_chatglm.checkpoint import tokenizer_file
from mlora_core.errors import MloraError

ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
#: THUDM's order: ChatGLM2's five, then ChatGLM3's role markers.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *ROLE_TOKENS)
#: Sentencepiece's word-boundary mark (a space in the text).
SPACE = "\u2581"
_ROLE_PATTERN = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM2/3's sentencepiece tokenizer (see the module docstring for its rules)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, encode_special_tokens: bool = False, **kwargs: Any) -> None:
        import sentencepiece

        self.vocab_file = vocab_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.encode_special_tokens = encode_special_tokens
        n = self.sp.vocab_size()
        self.special_ids = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._marker = self._marker_piece()
        if self.sp.eos_id() < 0:
            raise MloraError(f"{vocab_file}: the sentencepiece model has no </s> piece")
        unk = self.sp.id_to_piece(self.sp.unk_id())
        kwargs.setdefault("eos_token", self.sp.id_to_piece(self.sp.eos_id()))
        kwargs.setdefault("unk_token", unk)
        kwargs.setdefault("pad_token", unk)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        """The id of a special token (``[gMASK]``, ``sop``, ``<|user|>``, ...), as THUDM's method."""
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a ChatGLM special token; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_ids[token]

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:  # type: ignore[override]  # as PreTrainedTokenizer's
        """The pieces of ``text``; nothing written in it becomes a special token but the role
        markers under ``encode_special_tokens``.

        transformers' base class splits the text on its special tokens first, which would
        turn a literal ``</s>`` or ``<unk>`` into EOS (id 2) or the unknown token (id 0).
        ``split_special_tokens`` is accepted and ignored.
        """
        kwargs.pop("split_special_tokens", None)
        text, _ = self.prepare_for_tokenization(text, **kwargs)
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if not self.encode_special_tokens:
            return list(self.sp.encode(text, out_type=str))
        pieces: list[str] = []
        start = 0
        for match in _ROLE_PATTERN.finditer(text):
            if match.start() > start:
                pieces += self.sp.encode(text[start : match.start()], out_type=str)
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces += self.sp.encode(text[start:], out_type=str)
        return pieces

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return int(self.sp.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        """A piece, a special token, or ``""`` for an id outside both (decoded as nothing)."""
        n = self.sp.vocab_size()
        if 0 <= index < n:
            return str(self.sp.id_to_piece(index))
        if n <= index < n + len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[index - n]
        return ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, run = "", list[str]()
        for token in tokens:  # special tokens are not sentencepiece pieces: decode around them
            if token in self.special_ids:
                text += self._decode_run(run, at_start=not text) + token
                run = []
            elif token:  # "" stands for an id outside the vocabulary
                run.append(token)
        return text + self._decode_run(run, at_start=not text)

    def _decode_run(self, pieces: list[str], at_start: bool) -> str:
        """Sentencepiece's text for ``pieces``; past the start of the text a leading ``▁`` stays a space.

        Sentencepiece drops the leading ``▁`` of the first piece of what it decodes (the
        dummy prefix it adds in encoding). Decoded after the marker piece, the run keeps it.
        """
        if not pieces:
            return ""
        if at_start or self._marker is None:
            return str(self.sp.decode(pieces))
        return str(self.sp.decode([self._marker, *pieces]))[len(self._marker) :]

    def _marker_piece(self) -> str | None:
        """A plain piece with no ``▁`` that decodes to itself, or None if the model has none."""
        sp = self.sp
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
                continue
            piece = str(sp.id_to_piece(i))
            if SPACE not in piece and sp.decode([piece]) == piece:
                return piece
        return None

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[gMASK] sop A``, or ``[gMASK] sop A B </s>`` for a pair."""
        ids = [self.get_command("[gMASK]"), self.get_command("sop"), *token_ids_0]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.eos_token_id]
        return ids

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3's message: ``<|role|>``, then ``metadata + "\\n"`` and ``message`` encoded apart."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        encode = self.sp.encode
        return [self.get_command(f"<|{role}|>"), *encode(f"{metadata}\n"), *encode(message)]

    def build_chat_input(self, query: str, history: Sequence[Mapping[str, str]] = (), role: str = "user") -> list[int]:
        """ChatGLM3's prompt ids: ``[gMASK] sop``, each history message, the query, ``<|assistant|>``.

        Args:
            query: the new message.
            history: earlier messages, each ``{"role": ..., "content": ..., "metadata": ...}``.
            role: the new message's role.
        """
        ids = [self.get_command("[gMASK]"), self.get_command("sop")]
        for item in history:
            ids += self.build_single_message(item["role"], item.get("metadata", ""), item["content"])
        ids += self.build_single_message(role, "", query)
        return ids + [self.get_command("<|assistant|>")]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}tokenizer.model"
        target.write_bytes(Path(self.vocab_file).read_bytes())
        return (str(target),)


def chatglm2_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM2's chat prompt text: numbered rounds of ``问：`` (question) and ``答：`` (answer)."""
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1)]
    return "".join(rounds) + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def load_tokenizer(path: Path, model_config: Mapping[str, Any]) -> Any:
    """The checkpoint's tokenizer: ``tokenizer.json`` if present, else :class:`ChatGLMTokenizer`.

    ``model_config`` (config.json) supplies EOS and pad ids a tokenizer.json leaves unset.
    """
    file = tokenizer_file(path)
    if file.name == "tokenizer.model":
        return ChatGLMTokenizer(str(file))
    return load_fast_tokenizer(path, model_config)


def load_fast_tokenizer(path: Path, model_config: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """``tokenizer.json`` (+ tokenizer_config.json) as a plain fast tokenizer, never remote code."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        eos = model_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise MloraError(f"{path}: neither tokenizer_config.json nor config.json names an EOS token")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None:
        pad = model_config.get("pad_token_id")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad) if isinstance(pad, int) else tokenizer.eos_token
    return tokenizer
