"""Shared fixtures: tiny random checkpoints (LLaMA and the other decoder families) with a locally
trained tokenizer, alpaca data, configs."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlora_core.plugin_api.host import PluginHost, create_plugin_manager

#: Qwen2's chat template (ChatML): a default system turn, ``<|im_start|>role\ncontent<|im_end|>\n``.
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WORDS = "apple river planet garden window silver orange rocket pencil basket candle forest guitar island".split()


def alpaca_records(n: int, seed: int, kind: str = "reverse") -> list[dict[str, str]]:
    """Synthetic alpaca records of varied lengths."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 4))
        text = " ".join(words)
        if kind == "reverse":
            records.append({"instruction": "Reverse the words.", "input": text, "output": " ".join(reversed(words))})
        else:
            records.append({"instruction": f"Repeat: {text}", "input": "", "output": text.upper()})
    return records


def yes_no_records(n: int) -> list[dict[str, str]]:
    """Alpaca records whose answers alternate between "no" and "yes": short, exactly checkable."""
    return [
        {"instruction": "Answer.", "input": r["input"], "output": "yes" if i % 2 else "no"}
        for i, r in enumerate(alpaca_records(n, 1))
    ]


#: Every projection of the LLaMA backend.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], min_step: int = 6) -> None:
    """Wait until the run ``proc`` (writing into ``out``) has a checkpoint at step >= ``min_step``."""
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= min_step:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step >= {min_step} before the run ended: {proc.communicate()}")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


#: A tiny checkpoint of each decoder family (``model_type``), with settings that exercise
#: what sets it apart: sliding windows shorter than a sample, Gemma 2's logit soft-capping,
#: Granite's multipliers. Tests parametrized over families use these.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 24},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"sliding_window": 24, "final_logit_softcapping": 3.0},
    "gemma3_text": {"sliding_window": 24},
    "phi3": {},
    "olmo2": {},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
}


def write_gguf_metadata(path: Path, architecture: str, name: str = "tiny") -> Path:
    """A real GGUF file (written by the ``gguf`` package) with metadata and no tensors: enough
    for detection, which reads only ``general.architecture``."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_tiny_llama(out: Path, **overrides: Any) -> Path:
    """Save a 2-layer random LlamaForCausalLM (safetensors) with a byte-level BPE tokenizer in ``out``."""
    return build_tiny_decoder(out, "llama", **overrides)


def build_tiny_decoder(out: Path, model_type: str, **overrides: Any) -> Path:
    """Save a 2-layer random ``model_type`` causal LM (transformers' own class, safetensors) with a
    byte-level BPE tokenizer in ``out``; ``overrides`` go to its config, after :data:`FAMILY_SETTINGS`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from mlora_data.templates import ALPACA

    records = alpaca_records(200, 0) + alpaca_records(200, 1, "repeat")
    corpus = [ALPACA.prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(out)
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **FAMILY_SETTINGS[model_type],
        **overrides,
    }
    settings.setdefault("vocab_size", len(tokenizer))  # larger: ids the tokenizer never produces
    settings.setdefault("head_dim", settings["hidden_size"] // settings["num_attention_heads"])
    config = AutoConfig.for_model(
        model_type,
        max_position_embeddings=512,
        tie_word_embeddings=model_type.startswith("gemma"),  # as the families ship
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **settings,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out


E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e/ ``e2e``; skip ``gpu`` tests where CUDA is missing."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if E2E_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def confident_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA with larger initial weights: with the default 0.02 its frozen LM head
    cannot make any token much likelier than another, so no answer is ever greedy-right."""
    return build_tiny_llama(tmp_path_factory.mktemp("confident-llama"), initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random LLaMA (hidden 32) with a locally trained tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA at hidden 192: wide enough that packed steps choose rows holding several
    samples (their attention then costs less than the padding it saves)."""
    return build_tiny_llama(tmp_path_factory.mktemp("wide-llama"), hidden_size=192, intermediate_size=384)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_decoder(model_type, wide=False)``: the family's tiny checkpoint (:func:`build_tiny_decoder`),
    built once; ``wide``: at hidden 192, as :func:`wide_llama_dir` (packed rows then hold several samples)."""
    built: dict[tuple[str, bool], Path] = {}

    def get(model_type: str, wide: bool = False) -> Path:
        if (model_type, wide) not in built:
            out = tmp_path_factory.mktemp(f"{'wide' if wide else 'tiny'}-{model_type}")
            sizes = {"hidden_size": 192, "intermediate_size": 384} if wide else {}
            built[model_type, wide] = build_tiny_decoder(out, model_type, **sizes)
        return built[model_type, wide]

    return get


def family_targets(model_type: str, llama_names: list[str]) -> list[str]:
    """LLaMA layer names as the family calls them (Phi-3 fuses q/k/v and gate/up)."""
    if model_type != "phi3":
        return llama_names
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
    names = [fused.get(n, n) for n in llama_names if n != "up_proj"] or ["gate_up_proj"]
    return list(dict.fromkeys(names))


@pytest.fixture
def host() -> PluginHost:
    """Built-in plugins only: no third-party entry points."""
    return create_plugin_manager(autoload=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", alpaca_records(40, 1))
    write_jsonl(d / "b.jsonl", alpaca_records(30, 2, "repeat"))
    write_jsonl(d / "c.jsonl", alpaca_records(24, 3))
    return d


def job(name: str, data: Path, **train: Any) -> dict[str, Any]:
    """A job dict with small, quick defaults; ``adapter=`` and ``data_opts=`` override sections."""
    adapter = train.pop(
        "adapter", {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    )
    data_opts = train.pop("data_opts", {})
    settings = {"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "max_steps": 3, **train}
    return {
        "name": name,
        "adapter": adapter,
        "data": {"type": "alpaca", "path": str(data), "cutoff_len": 256, "val_set_size": 4, **data_opts},
        "train": settings,
    }


@pytest.fixture
def make_config(tmp_path: Path, tiny_llama_dir: Path) -> Callable[..., Path]:
    """Write a YAML config over the tiny model; returns its path."""

    def make(jobs: list[dict[str, Any]], **top: Any) -> Path:
        cfg: dict[str, Any] = {
            "base_model": {"backend": "llama", "path": str(tiny_llama_dir), "dtype": "fp32"},
            "scheduler": {"type": "trivial"},
            "monitor": {"console": None},
            "output_dir": str(tmp_path / "out"),
            "jobs": jobs,
        }
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sentencepiece tokenizer.model, trained here."""
    from tiny_chatglm import train_sentencepiece

    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def tiny_chatglm_dir(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """A tiny ChatGLM2/3 checkpoint: safetensors in two shards, sentencepiece tokenizer."""
    import shutil

    from tiny_chatglm import TINY, chatglm_weights, write_checkpoint

    out = write_checkpoint(tmp_path_factory.mktemp("tiny-chatglm"), chatglm_weights(TINY), "safetensors")
    shutil.copy(sp_model, out / "tokenizer.model")
    return out
