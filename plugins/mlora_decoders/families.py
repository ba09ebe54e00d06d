"""The decoder-only model families the ``mlora_decoders`` backends load, and what differs between them.

Each family is one transformers ``*ForCausalLM`` class. What an adapter may target is the
short names of the linear layers inside a decoder block (checked against the models in the
tests); the default targets are PEFT's defaults for the family.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The LLaMA layout of a decoder block's linear layers, shared by most families.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One model family: a backend name, the checkpoints it loads and the layers adapters may target."""

    #: The backend's name (``base_model.backend``).
    backend: str
    #: ``model_type`` values of the config.json files it loads.
    model_types: tuple[str, ...]
    #: The transformers class that loads it.
    model_class: str
    #: Short names of a decoder block's linear layers.
    target_modules: tuple[str, ...] = LLAMA_LINEARS
    #: The targets when a job names none (PEFT's defaults for the family).
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    #: ``general.architecture`` values of ``.gguf`` files transformers can de-quantize into it.
    gguf_architectures: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    f.backend: f
    for f in (
        Family("llama", ("llama",), "LlamaForCausalLM", gguf_architectures=("llama",)),
        # Sliding-window attention (config ``sliding_window``).
        Family("mistral", ("mistral",), "MistralForCausalLM", gguf_architectures=("mistral",)),
        # q/k/v projections carry biases (frozen, part of the base).
        Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", gguf_architectures=("qwen2",)),
        # Per-head RMSNorm of queries and keys.
        Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", gguf_architectures=("qwen3",)),
        # Tied embeddings; final logit soft-capping; attention soft-capping (eager attention).
        Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", gguf_architectures=("gemma2",)),
        # The text-only Gemma 3 (1B, or a text checkpoint); the multimodal ``gemma3`` is not loaded.
        Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", gguf_architectures=("gemma3",)),
        # Fused query/key/value and gate/up projections.
        Family(
            "phi3",
            ("phi3",),
            "Phi3ForCausalLM",
            target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            default_targets=("qkv_proj",),
            gguf_architectures=("phi3",),
        ),
        # RMSNorm of the whole query and key projections, after the projection.
        Family("olmo2", ("olmo2",), "Olmo2ForCausalLM"),
        # Embedding, residual, attention and logit multipliers (``logits_scaling``).
        Family("granite", ("granite",), "GraniteForCausalLM"),
    )
}


def family_of_model_type(model_type: object) -> Family | None:
    """The family that loads config.json's ``model_type``, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def family_of_gguf_architecture(architecture: str | None) -> Family | None:
    """The family a ``.gguf`` file's ``general.architecture`` de-quantizes into, or None."""
    return next((f for f in FAMILIES.values() if architecture in f.gguf_architectures), None)
