"""A native ChatGLM2/3 causal LM in THUDM's module naming, so checkpoints load as they are.

ChatGLM2-6B and ChatGLM3-6B share one architecture (Du et al., 2022, "GLM", as revised for
ChatGLM2): pre-norm decoder blocks with RMSNorm, grouped-query attention with one fused
``query_key_value`` projection (with bias), rotary position embedding on the first half of
each head's dimensions applied to *interleaved* pairs ``(x[2i], x[2i+1])``, and a SwiGLU
MLP whose ``dense_h_to_4h`` output holds the gate and the up projection side by side.

Module paths equal THUDM's, so checkpoint keys and PEFT adapter keys match theirs::

    transformer.embedding.word_embeddings                          Embedding(V, H)
    transformer.encoder.layers.N.input_layernorm                   RMSNorm(H)
    transformer.encoder.layers.N.self_attention.query_key_value    Linear(H, (n + 2g) * d, bias)
    transformer.encoder.layers.N.self_attention.dense              Linear(n * d, H)
    transformer.encoder.layers.N.post_attention_layernorm          RMSNorm(H)
    transformer.encoder.layers.N.mlp.dense_h_to_4h                 Linear(H, 2 * F)
    transformer.encoder.layers.N.mlp.dense_4h_to_h                 Linear(F, H)
    transformer.encoder.final_layernorm                            RMSNorm(H)
    transformer.output_layer                                       Linear(H, V)

(V padded vocab, H hidden, n heads, g query groups, d = kv_channels, F ffn size.) THUDM's
checkpoints also hold ``transformer.rotary_pos_emb.inv_freq``, a buffer their forward does
not read; here the rotary tables are computed from the config on every forward.

The model is for training adapters over a frozen base: no KV cache, no dropout, and every
projection is a plain ``nn.Linear`` called as a module, so adapters and quantization can
replace any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlora_chatglm.config import ChatGLMConfig


@dataclass
class CausalLMOutput:
    """What :meth:`ChatGLMForCausalLM.forward` returns."""

    logits: torch.Tensor  # (B, T, V)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as THUDM's ``RMSNorm`` (Zhang & Sennrich, 2019)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., H) -> (..., H), same dtype."""
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotary_tables(
    config: ChatGLMConfig, length: int, device: torch.device, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (T, d / 4) (with ``position_ids`` (B, T): (B, T, d / 4)), in fp32.

    The rotary part is the first ``d / 2`` dims of a head: ``d / 4`` pairs, pair ``i`` turned
    by ``(t / r) * base ** (-2i / (d / 2))`` at position ``t`` (Su et al., 2021, "RoFormer",
    section 3.4.2). ``rope_ratio`` enters as THUDM's code for the model uses it: ChatGLM3-6B-32k
    and GLM-4 set ``base = 10000 * rope_ratio`` and ``r = 1``; ChatGLM2-6B-32k keeps
    ``base = 10000`` and interpolates positions, ``r = rope_ratio`` (Chen et al., 2023,
    "Extending Context Window of Large Language Models via Positional Interpolation").
    Positions are ``0..length-1``, or ``position_ids`` (packed rows: restarting with each sample),
    interpolated alike.
    """
    rot = config.kv_channels // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    if position_ids is not None:
        positions = position_ids.to(torch.float32)  # (B, T)
    else:
        positions = torch.arange(length, dtype=torch.float32, device=device)  # (T,)
    divisor = config.rope_position_divisor
    if divisor != 1.0:
        positions = positions / divisor
    angles = positions[..., None] * inv_freq  # (T, rot / 2) or (B, T, rot / 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the first ``2 * cos.shape[-1]`` dims; x: (B, T, heads, d)."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)  # (B, T, heads, rot / 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c = cos.to(x.dtype).unsqueeze(-2)  # (T, 1, rot / 2) or (B, T, 1, rot / 2), broadcast over heads
    s = sin.to(x.dtype).unsqueeze(-2)
    turned = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return torch.cat((turned, x_pass), dim=-1)


class SelfAttention(nn.Module):
    """Grouped-query causal self-attention with the fused ``query_key_value`` projection."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.groups, config.kv_channels
        qkv_size = (self.heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, T, H); mask: (B, 1, T, T) bool, True = may attend (None: causal only) -> (B, T, H)."""
        b, t, _ = x.shape
        d = self.head_dim
        qkv = self.query_key_value(x)  # (B, T, (n + 2g) * d): [queries | keys | values]
        q, k, v = qkv.split([self.heads * d, self.groups * d, self.groups * d], dim=-1)
        q = apply_rotary(q.view(b, t, self.heads, d), *rope)  # (B, T, n, d)
        k = apply_rotary(k.view(b, t, self.groups, d), *rope)  # (B, T, g, d)
        v = v.view(b, t, self.groups, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        per_group = self.heads // self.groups  # each key/value group serves consecutive heads
        k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)  # (B, n, T, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, n, T, d)
        return self.dense(out.transpose(1, 2).reshape(b, t, self.heads * d))


class MLP(nn.Module):
    """SwiGLU: ``dense_4h_to_h(silu(gate) * up)`` with ``[gate | up] = dense_h_to_4h(x)``."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # each (B, T, F)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        x = x + self.self_attention(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    """Token embeddings (THUDM wraps them in a module of their own)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> (B, T, H)."""
        return self.word_embeddings(input_ids)


class Encoder(nn.Module):
    """The stack of blocks and the final norm."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.final_layernorm(x)


class ChatGLMModel(nn.Module):
    """``transformer``: embedding, encoder and output layer."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (1 = token): (B, T) -> final hidden states (B, T, H).

        Packed rows: ``position_ids`` (B, T) restarting at 0 with each sample, and no
        attention mask; attention then stays within each sample.
        """
        x = self.embedding(input_ids)  # (B, T, H)
        rope = rotary_tables(self.config, input_ids.shape[1], input_ids.device, position_ids)
        mask = packed_mask_4d(position_ids) if position_ids is not None else attention_mask_4d(attention_mask)
        return self.encoder(x, rope, mask)  # type: ignore[no-any-return]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (1 = token): (B, T) -> logits (B, T, V)."""
        return self.output_layer(self.hidden_states(input_ids, attention_mask, position_ids))  # type: ignore[no-any-return]


def attention_mask_4d(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) padding mask -> (B, 1, T, T) bool, True = may attend; None when nothing is padded.

    A position attends to earlier (and its own) positions that are tokens. A pad position
    also attends to itself, so no row is empty; a token never sees a pad.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    own = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    return causal & (keys | own)


def packed_mask_4d(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 with each packed sample -> (B, 1, T, T) bool, True = may attend.

    Block-diagonal causal: a position attends to earlier (and its own) positions of its own sample.
    """
    t = position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = starts.cumsum(dim=1)  # (B, T): which sample each position belongs to
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


class ChatGLMForCausalLM(nn.Module):
    """The causal LM (THUDM's ``ChatGLMForConditionalGeneration``): ``transformer`` plus the contract.

    ``model(input_ids=(B, T), attention_mask=(B, T))`` returns :class:`CausalLMOutput` with
    ``logits`` (B, T, V), V the padded vocabulary.
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        """The LM head, which quantization and adapters leave alone."""
        return self.transformer.output_layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids: (B, T) long; attention_mask: (B, T), 1 = token, 0 = pad -> logits (B, T, V).

        Packed rows: ``position_ids`` (B, T) instead of the attention mask.
        """
        return CausalLMOutput(logits=self.transformer(input_ids, attention_mask, position_ids))
