"""The decoder families' backends: detection, the layers adapters may target, the head split.

Training against PEFT (``test_equivalence_peft.py``), generation (``test_generation.py``),
packed steps and distribution are proven for every family by those tests, parametrized over
:data:`conftest.FAMILY_SETTINGS`.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_SETTINGS, job, write_gguf_metadata
from torch import nn

from mlora_core.config.schema import BaseModelConfig, load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.models.loading import load_base_model
from mlora_core.models.transformers_split import LogitsHead
from mlora_decoders.families import FAMILIES, family_of_model_type

MODEL_TYPES = list(FAMILY_SETTINGS)


def test_every_family_is_tested_and_every_model_type_has_one_family():
    assert sorted(m for f in FAMILIES.values() for m in f.model_types) == sorted(MODEL_TYPES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_detected_family_names_exactly_the_models_block_layers(host, tiny_decoder, model_type):
    """The backend detected from config.json lists exactly the linear layers of the model's
    decoder blocks, as transformers builds them, and its defaults are among them."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_decoder(model_type)
    family = family_of_model_type(model_type)
    assert family is not None
    assert host.detect_backend(model_dir, json.loads((model_dir / "config.json").read_text())) == family.backend
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    block_linears = {
        name.rsplit(".", 1)[-1]
        for name, module in model.get_decoder().layers.named_modules()
        if isinstance(module, nn.Linear)
    }
    assert block_linears == set(family.target_modules)
    assert set(family.default_targets) <= block_linears


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_split_head_gives_the_models_own_logits(host, tiny_decoder, model_type):
    """hidden states then LM head (with Gemma's soft-capping, Granite's scaling) equal
    transformers' forward, on a padded batch."""
    loaded = load_base_model(host, BaseModelConfig(path=str(tiny_decoder(model_type)), dtype="fp32"))
    assert loaded.hidden_states is not None and loaded.lm_head is not None
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ours = loaded.lm_head(loaded.hidden_states(ids, mask))
        theirs = loaded.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    config = loaded.model.config
    transforms = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) != 1.0
    assert isinstance(loaded.lm_head, LogitsHead) == bool(transforms)


def test_gguf_files_are_detected_from_their_architecture(host, tmp_path):
    """The family comes from the GGUF metadata (not the file name); architectures transformers
    cannot de-quantize into a supported family, and unreadable files, are not claimed."""
    for architecture, backend in (("llama", "llama"), ("qwen2", "qwen2"), ("gemma3", "gemma3"), ("phi3", "phi3")):
        path = write_gguf_metadata(tmp_path / f"{architecture}.gguf", architecture)
        assert host.detect_backend(path, None) == backend
    assert host.detect_backend(write_gguf_metadata(tmp_path / "bert.gguf", "bert"), None) is None
    (tmp_path / "broken.gguf").write_bytes(b"GGUF")
    assert host.detect_backend(tmp_path / "broken.gguf", None) is None


def test_a_backend_named_for_another_family_is_refused_before_loading(make_config, data_dir, host, tiny_decoder):
    config = load_config(
        make_config(
            [job("a", data_dir / "a.jsonl")], base_model={"backend": "llama", "path": str(tiny_decoder("qwen2"))}
        )
    )
    expected = r"holds a 'qwen2' model \(model_type\), not a llama one \(use backend 'qwen2'"
    with pytest.raises(ConfigError, match=expected):
        validate_config(config, host)


def test_targets_missing_from_the_family_are_refused_naming_those_it_has(make_config, data_dir, host, tiny_decoder):
    """Phi-3 fuses q/k/v: q_proj is refused before the model loads, and the fused names listed."""
    jobs = [job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")]
    del jobs[1]["adapter"]["target_modules"]  # the family's default
    config = load_config(make_config(jobs, base_model={"backend": None, "path": str(tiny_decoder("phi3"))}))
    with pytest.raises(ConfigError) as err:
        validate_config(config, host)
    assert str(err.value).count("\n") == 1  # one problem: job b's default fits
    assert (
        "jobs[0].adapter.target_modules: ['q_proj', 'v_proj'] match no layer of this model; its layers adapters "
        "may target: qkv_proj, o_proj, gate_up_proj, down_proj"
    ) in str(err.value)
    assert config.jobs[1].adapter.target_modules == ["qkv_proj"]


def test_an_unknown_model_type_lists_the_supported_ones_in_one_line(make_config, data_dir, host, tmp_path):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    config = load_config(
        make_config([job("a", data_dir / "a.jsonl")], base_model={"backend": None, "path": str(other)})
    )
    with pytest.raises(ConfigError) as err:
        validate_config(config, host)
    (line,) = [p for p in str(err.value).splitlines() if "bert" in p]
    assert "no backend recognises" in line and "model_type 'bert'" in line
    for model_type in MODEL_TYPES:
        assert model_type in line
    assert "mlora_register_backends" in line
