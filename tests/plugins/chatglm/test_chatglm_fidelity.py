"""Fidelity to THUDM's ChatGLM2/3 (issue 16): what ``rope_ratio`` means, and tokenizer edge cases.

Rotary angles: THUDM's ChatGLM2-6B-32k ``RotaryEmbedding`` computes ``theta_i = 1 / 10000 **
(2i / n)`` and positions ``t / rope_ratio`` (position interpolation); ChatGLM3-6B-32k and GLM-4
set ``base = 10000 * rope_ratio`` with plain positions (docs/backends/chatglm.md). The expected
angles below are worked out by hand from those definitions, for ``kv_channels`` 16: the rotary
part is 8 dims, 4 pairs, pair ``i`` turning by ``t * base ** (-i / 4)``.

Tokenizer: the expected ids follow from the tiny sentencepiece model's pieces: its corpus has
no ``<``, ``/`` or ``>``, so those characters are byte-fallback pieces and ``</s>`` in text is
``▁ <0x3C> <0x2F> s <0x3E>``, never id 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_chatglm import qkv_job, write_config
from tiny_chatglm import SP_VOCAB, TINY, chatglm_weights, load, max_relative_error, to_glm

from mlora_chatglm.backend import ChatGLMBackend
from mlora_chatglm.config import ChatGLMConfig, ChatGLMConfigError, model_family, rope_ratio_scales
from mlora_chatglm.model import rotary_tables
from mlora_chatglm.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer
from mlora_core.config.schema import BaseModelConfig, load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError, MloraError

#: TINY without the model name: a config that says nothing about which model it is.
UNNAMED = {k: v for k, v in TINY.items() if k != "_name_or_path"}

# --- what rope_ratio means ---------------------------------------------------------------

#: Angle per position step of each rotary pair, (name, rope_ratio) -> 4 values, by hand:
#: ChatGLM2-6B-32k, rope_ratio 4: 10000 ** (-i / 4) / 4 = 10 ** -i / 4.
#: ChatGLM3-6B-32k and GLM-4, rope_ratio 16: base 160000 = 20 ** 4, so 20 ** -i.
#: rope_ratio absent (ChatGLM3-6B): 10 ** -i.
STEP_ANGLES = {
    ("THUDM/chatglm2-6b-32k", 4): [0.25, 0.025, 0.0025, 0.00025],
    ("THUDM/chatglm3-6b-32k", 16): [1.0, 0.05, 0.0025, 0.000125],
    ("THUDM/glm-4-9b-chat", 16): [1.0, 0.05, 0.0025, 0.000125],
    ("THUDM/chatglm3-6b", None): [1.0, 0.1, 0.01, 0.001],
}


def angles(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The angles back from their cos and sin (all below pi here)."""
    return torch.atan2(sin, cos)


@pytest.mark.parametrize(("name", "ratio"), list(STEP_ANGLES))
def test_rotary_angles_follow_each_model(name, ratio):
    raw = {**UNNAMED, "_name_or_path": name, "kv_channels": 16, "rope_ratio": ratio}  # None: absent
    config = ChatGLMConfig.from_dict(raw)
    step = torch.tensor(STEP_ANGLES[(name, ratio)])
    expected = torch.arange(4.0)[:, None] * step  # positions 0..3: (4, 4)
    cos, sin = rotary_tables(config, 4, torch.device("cpu"))
    torch.testing.assert_close(angles(cos, sin), expected, rtol=1e-5, atol=1e-6)
    # packed rows: the per-sample positions are interpolated alike
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 2, 0]])
    cos, sin = rotary_tables(config, 6, torch.device("cpu"), position_ids)
    torch.testing.assert_close(angles(cos, sin), position_ids[..., None] * step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"_name_or_path": "THUDM/chatglm2-6b-32k"}, "positions"),
        ({"_name_or_path": "/data/ckpt/ChatGLM2-6B-32k-sft/"}, "positions"),  # saved from a local copy
        ({"_name_or_path": "THUDM/chatglm3-6b-32k"}, "base"),
        ({"_name_or_path": "THUDM/glm-4-9b"}, "base"),
        ({"_name_or_path": "/models/glm4-9b-chat"}, "base"),
        ({"padded_vocab_size": 151552}, "base"),  # GLM-4's vocabulary
        ({"rope_ratio": 1}, "base"),  # unnamed, but both meanings give the same angles
        ({"rope_ratio": None}, "base"),
        ({"rope_ratio_scales": "positions"}, "positions"),
        ({"_name_or_path": "THUDM/chatglm3-6b-32k", "rope_ratio_scales": "positions"}, "positions"),  # key first
    ],
)
def test_config_says_what_rope_ratio_scales(changes, expected):
    assert rope_ratio_scales({**UNNAMED, **changes}) == expected


def test_model_family_from_the_name():
    assert model_family({"_name_or_path": "THUDM/chatglm2-6b"}) == "chatglm2"
    assert model_family({"_name_or_path": "THUDM/chatglm3-6b-base"}) == "chatglm3"
    assert model_family({"_name_or_path": "THUDM/glm-4-9b-chat-1m", "padded_vocab_size": 151552}) == "glm4"
    assert model_family({"_name_or_path": "/ckpt/chatglm2-then-chatglm3"}) is None  # says two
    assert model_family({"_name_or_path": "/ckpt/chatglm2-6b", "padded_vocab_size": 151552}) is None
    assert model_family({"_name_or_path": "/ckpt/my-model"}) is None
    assert model_family({}) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, r"has rope_ratio 2\.0 but does not say whether it is ChatGLM2"),
        ({"_name_or_path": "/ckpt/chatglm2-then-chatglm3"}, "does not say whether it is ChatGLM2"),
        ({"rope_ratio_scales": "theta"}, "rope_ratio_scales='theta'; expected 'positions' or 'base'"),
        ({"rope_ratio": 0}, "rope_ratio=0; expected a positive number"),
        ({"rope_ratio": "16"}, "rope_ratio='16'; expected a positive number"),
    ],
)
def test_unclear_rope_ratio_is_refused(changes, message):
    with pytest.raises(ChatGLMConfigError, match=message):
        ChatGLMConfig.from_dict({**UNNAMED, **changes})


def copy_with_config(src: Path, out: Path, raw: dict[str, Any]) -> Path:
    shutil.copytree(src, out)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_unnamed_rope_ratio_is_refused_at_validation(host, tmp_path, data_dir, tiny_chatglm_dir):
    out = copy_with_config(tiny_chatglm_dir, tmp_path / "unnamed", UNNAMED)
    [problem] = ChatGLMBackend().validate(BaseModelConfig(backend="chatglm", path=str(out)))
    assert problem.startswith("path: config.json has rope_ratio 2.0") and "\n" not in problem
    assert '"rope_ratio_scales": "positions" (ChatGLM2-6B-32k)' in problem
    assert '"rope_ratio_scales": "base" (ChatGLM3-6B-32k, GLM-4) to config.json' in problem
    cfg = load_config(write_config(tmp_path, {"path": str(out)}, [qkv_job(data_dir)]))
    with pytest.raises(ConfigError, match="rope_ratio_scales"):
        validate_config(cfg, host)  # backend detected, then refused before any weight is read
    with pytest.raises(MloraError, match="rope_ratio_scales"):
        load(out)
    # the fix the message names
    (out / "config.json").write_text(json.dumps({**UNNAMED, "rope_ratio_scales": "positions"}))
    assert ChatGLMBackend().validate(BaseModelConfig(backend="chatglm", path=str(out))) == []
    assert load(out).model.config.rope_ratio_scales == "positions"


def test_chatglm2_32k_forward_interpolates_positions(tmp_path, tiny_chatglm_dir):
    """Against transformers' GLM with linear RoPE scaling (positions divided by the factor),
    an implementation independent of ours; packed rows interpolate each sample's positions."""
    from transformers import GlmForCausalLM

    cfg = {**TINY, "_name_or_path": "THUDM/chatglm2-6b-32k"}
    out = copy_with_config(tiny_chatglm_dir, tmp_path / "chatglm2-32k", cfg)
    model = load(out).model.eval()
    config, weights = to_glm(chatglm_weights(TINY), cfg, interpolate=True)
    reference = GlmForCausalLM(config).eval()
    reference.load_state_dict(weights, strict=True)
    torch.manual_seed(0)
    ids = torch.randint(3, 400, (2, 13))
    with torch.no_grad():
        ours, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
        as_chatglm3 = load(tiny_chatglm_dir).model.eval()(input_ids=ids).logits
        packed = model(input_ids=ids.reshape(1, -1), position_ids=torch.arange(13).repeat(1, 2)).logits
    assert max_relative_error(ours, ref) < 1e-5
    assert max_relative_error(ours, as_chatglm3) > 1e-3  # the meaning matters
    assert max_relative_error(packed.reshape(2, 13, -1), ours) < 1e-5


# --- tokenizer ------------------------------------------------------------------------------


def char_pieces(sp: Any, text: str) -> list[int]:
    """The ids of ``text`` spelled one character at a time: the piece, or its byte-fallback piece."""
    ids = []
    for char in text:
        piece = sp.piece_to_id(char)
        ids.append(piece if not sp.is_unknown(piece) else sp.piece_to_id(f"<0x{ord(char):02X}>"))
    return ids


@pytest.mark.parametrize("encode_special_tokens", [False, True])
def test_literal_eos_unk_and_bos_are_text(sp_model, encode_special_tokens):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = ChatGLMTokenizer(str(sp_model), encode_special_tokens=encode_special_tokens)
    space = sp.piece_to_id("▁")  # the dummy prefix: "▁" alone, as "▁<" is no piece
    for text in ("</s>", "<unk>", "<s>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == [space, *char_pieces(sp, text)] == sp.encode(text), text
        assert not {0, 1, 2} & set(ids)
        assert tok.decode(ids) == text
    gmask, sop = tok.get_command("[gMASK]"), tok.get_command("sop")
    ids = tok("apple</s>river", "pear")["input_ids"]
    assert ids == [gmask, sop, *sp.encode("apple</s>river"), *sp.encode("pear"), 2]  # one EOS, at the end
    assert ids.count(2) == 1 and tok.tokenize("<unk>") == sp.encode("<unk>", out_type=str)


def test_decoding_keeps_the_space_after_a_special_token(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = ChatGLMTokenizer(str(sp_model))
    cmd = tok.get_command
    h = sp.encode("h")  # the dummy prefix and the letter
    assert tok.decode([cmd("[gMASK]"), cmd("sop"), *h]) == "[gMASK]sop h"
    assert tok.decode(h) == "h"  # at the start of the text the dummy prefix is no space
    assert tok.decode([*sp.encode("apple"), cmd("<|user|>"), *sp.encode("river")]) == "apple<|user|> river"
    assert tok.decode([cmd("eop"), *sp.encode("a</s>b")]) == "eop a</s>b"
    assert tok.decode([cmd("sop"), *sp.encode(" two")]) == "sop  two"  # a written space stays too
    assert tok.decode(tok("apple river")["input_ids"]) == "[gMASK]sop apple river"


def test_ids_outside_the_vocabulary_decode_as_nothing(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = ChatGLMTokenizer(str(sp_model))
    padding = list(range(SP_VOCAB + len(SPECIAL_TOKENS), TINY["padded_vocab_size"]))  # embedding rows only
    assert padding and tok.decode(padding) == ""
    assert tok.convert_ids_to_tokens([padding[0], 65023, -1]) == ["", "", ""]
    apple, gmask = sp.encode("apple"), tok.get_command("[gMASK]")
    assert tok.decode([*apple, padding[-1], *sp.encode("river"), -100]) == "apple river"
    assert tok.decode([gmask, padding[0], *apple]) == "[gMASK] apple"
    assert tok.decode([padding[0], *apple], skip_special_tokens=True) == "apple"
