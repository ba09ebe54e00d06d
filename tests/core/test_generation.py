"""Batched multi-adapter generation equals PEFT generating with each adapter alone.

Every reference here is independent of mlora's LoRA code: transformers' own model (and its
own bitsandbytes quantization), PEFT's ``PeftModel.from_pretrained`` over the same saved
adapter, and transformers' ``generate``, one prompt at a time, without padding. mlora
generates for all prompts and adapters in one left-padded batch with a KV cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SETTINGS, build_tiny_decoder, build_tiny_llama
from peft_reference import reference_base
from safetensors.torch import load_file, save_file
from tiny_chatglm import TINY, chatglm_weights, to_glm

from mlora_core.cli.main import main as cli_main
from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.errors import MloraError
from mlora_core.generation.decode import GenerationRequest, GenerationSettings, generate, generation_batches, left_pad
from mlora_core.models.loading import load_base_model
from mlora_core.models.saved_adapters import load_adapter
from mlora_core.plugin_api.hookspecs import hookimpl
from mlora_core.plugin_api.host import create_plugin_manager
from mlora_core.plugin_api.routing import RowRouter

PROMPTS = [
    "Reverse the words: apple river",
    "Repeat",
    "garden window silver orange rocket pencil basket candle",
    "Below is an instruction",
]
NEW = 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA with larger initial weights, so its next-token choices are clear-cut."""
    return build_tiny_llama(tmp_path_factory.mktemp("gen-llama"), initializer_range=0.3)


@pytest.mark.parametrize("model_type", [t for t in FAMILY_SETTINGS if t != "llama"])
def test_every_decoder_family_generates_like_peft(model_type, tmp_path):
    """Each family's KV-cache decoding (sliding windows, soft-capping, fused projections
    included), with two PEFT-saved adapters and the bare base in one mixed batch."""
    from mlora_decoders.families import family_of_model_type

    base = build_tiny_decoder(tmp_path / "base", model_type, initializer_range=0.3)
    family = family_of_model_type(model_type)
    assert family is not None
    layers = list(family.target_modules)  # every other layer each: both change the greedy tokens
    adapters = {
        "a": save_peft_adapter(base, tmp_path / "a", 1, layers[::2]),
        "b": save_peft_adapter(base, tmp_path / "b", 2, layers[1::2], r=2),
    }
    check_against_peft(base, adapters, None, None)


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    """Widths that are not multiples of 32: bitsandbytes' repacked CPU layout would fail on them."""
    out = tmp_path_factory.mktemp("gen-odd")
    return build_tiny_llama(out, hidden_size=40, intermediate_size=72, initializer_range=0.3)


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero A and B (B starts at zero), so each adapter really changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)


def save_peft_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 4, **lora: object) -> Path:
    """An adapter made and saved by PEFT itself (``PeftModel.save_pretrained``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, **lora),  # type: ignore[arg-type]
    )
    _randomize_lora(model, seed)
    model.save_pretrained(out)
    return out


def save_mlora_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 8) -> Path:
    """An adapter attached and saved by mlora's ``lora`` type."""
    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(backend="llama", path=str(base)))
    config = AdapterConfig(r=r, alpha=r, dropout=0.0, target_modules=targets)
    adapter = host.adapters.create("lora").attach(loaded.model, "x", config, RowRouter())
    _randomize_lora(loaded.model, seed)
    adapter.save(str(out), str(base))
    return out


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-adapters")
    return {
        "a": save_peft_adapter(base_dir, root / "a", 1, ["q_proj", "v_proj"]),
        "b": save_mlora_adapter(base_dir, root / "b", 2, ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]),
        "c": save_peft_adapter(base_dir, root / "c", 3, ["gate_proj", "v_proj"], r=2),
    }


def tokenize(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


def peft_greedy(
    base: Path, adapter: Path | None, prompts: list[list[int]], quantize: str | None = None, eos: int | None = None
) -> list[list[int]]:
    """transformers + PEFT greedy generation, one prompt at a time, without padding; EOS cut off."""
    adapters = {"x": adapter} if adapter is not None else {}
    return peft_greedy_each(base, adapters, prompts, quantize, eos)["x" if adapter is not None else None]


def peft_greedy_each(
    base: Path, adapters: dict[str, Path], prompts: list[list[int]], quantize: str | None = None, eos: int | None = None
) -> dict[str | None, list[list[int]]]:
    """:func:`peft_greedy` for the bare base (key None) and each adapter alone, over one reference model."""
    from peft import PeftModel

    model = reference_base(base, quantize)
    eos_id = model.config.eos_token_id if eos is None else eos
    out: dict[str | None, list[list[int]]] = {None: _greedy_each(model, prompts, eos_id)}
    for i, (name, directory) in enumerate(adapters.items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(directory), adapter_name=name)
        else:
            model.load_adapter(str(directory), adapter_name=name)
        model.set_adapter(name)
        out[name] = _greedy_each(model, prompts, eos_id)
    return out


def _greedy_each(model, prompts: list[list[int]], eos_id: int) -> list[list[int]]:
    model.eval()
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=model.config.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        outputs.append(new[: new.index(eos_id)] if eos_id in new else new)
    return outputs


def mlora_model(base: Path, adapters: dict[str, Path], quantize: str | None = None):
    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(path=str(base), quantize=quantize))  # backend detected
    router = RowRouter()
    for name, directory in adapters.items():
        load_adapter(host, loaded.model, name, directory, router)
    return loaded, router


def mixed_requests(prompts: list[list[int]], names: list[str | None]) -> list[GenerationRequest]:
    """Every prompt with every adapter, interleaved so no two neighbours share an adapter."""
    return [GenerationRequest(p, names[(i + j) % len(names)]) for j in range(len(names)) for i, p in enumerate(prompts)]


def check_against_peft(base: Path, adapters: dict[str, Path], quantize: str | None, batch_size: int | None) -> None:
    prompts = tokenize(base, PROMPTS)
    loaded, router = mlora_model(base, adapters, quantize)
    names: list[str | None] = [None, *adapters]
    requests = mixed_requests(prompts, names)
    eos = {loaded.tokenizer.eos_token_id}
    results = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW), eos, 0, batch_size)

    reference = peft_greedy_each(base, adapters, prompts, quantize)
    for request, result in zip(requests, results, strict=True):
        expected = reference[request.adapter][prompts.index(request.prompt_ids)]
        assert result.token_ids == expected, f"adapter {request.adapter}, prompt {request.prompt_ids}"
        assert result.finish_reason == ("length" if len(expected) == NEW else "eos")
    # the adapters really differ from each other and from the base, so the test could fail
    outputs = {name: tuple(map(tuple, ref)) for name, ref in reference.items()}
    assert len(set(outputs.values())) == len(names)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_mixed_batch_equals_peft_with_each_adapter_alone(base_dir, adapters, batch_size):
    check_against_peft(base_dir, adapters, None, batch_size)


@pytest.fixture(scope="module")
def odd_adapters(odd_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-odd-adapters")
    return {
        "a": save_peft_adapter(odd_dir, root / "a", 1, ["q_proj", "v_proj"]),
        "b": save_peft_adapter(odd_dir, root / "b", 2, ["k_proj", "down_proj"], r=2),
    }


def test_nf4_base_equals_peft_over_the_same_quantized_model(odd_dir, odd_adapters):
    check_against_peft(odd_dir, odd_adapters, "nf4", None)


def test_int8_base_one_row_at_a_time_equals_peft(odd_dir, odd_adapters):
    """LLM.int8() picks outlier columns over the whole batch, so a row's output depends on its batch."""
    check_against_peft(odd_dir, odd_adapters, "int8", 1)


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_mixed_batch_equals_peft_generating_the_same_mixed_batch(odd_dir, odd_adapters, quantize):
    """PEFT's own mixed-adapter batches (``adapter_names``) on the same left-padded rows give the same tokens."""
    from peft import PeftModel

    prompts = tokenize(odd_dir, PROMPTS)
    loaded, router = mlora_model(odd_dir, odd_adapters, quantize)
    requests = mixed_requests(prompts, [None, *odd_adapters])
    results = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW), {1}, 0)

    reference = PeftModel.from_pretrained(reference_base(odd_dir, quantize), str(odd_adapters["a"]), adapter_name="a")
    reference.load_adapter(str(odd_adapters["b"]), adapter_name="b")
    reference.eval()
    (order,) = generation_batches(requests, None)  # the rows as mlora batched them
    ids, mask = left_pad([requests[i].prompt_ids for i in order], 0)
    names = [requests[i].adapter or "__base__" for i in order]
    with torch.no_grad():
        out = reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=1,
            pad_token_id=0, adapter_names=names,
        )  # fmt: skip
    for row, i in enumerate(order):
        new = out[row, ids.shape[1] :].tolist()
        assert results[i].token_ids == (new[: new.index(1)] if 1 in new else new)
    assert len({tuple(r.token_ids) for r in results}) > len(prompts)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_training_after_generation_still_gets_gradients(odd_dir, quantize):
    """The CPU repacking trap (FACTS.md): generation's eval, no-grad forwards must not disable training."""
    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(backend="llama", path=str(odd_dir), quantize=quantize))
    router = RowRouter()
    adapter = host.adapters.create("lora").attach(
        loaded.model, "t", AdapterConfig(r=2, target_modules=["q_proj", "down_proj"]), router
    )
    ids = tokenize(odd_dir, PROMPTS[:2])
    loaded.model.train()
    generate(
        loaded.model, router, [GenerationRequest(i, "t") for i in ids], GenerationSettings(max_new_tokens=4), {1}, 0
    )
    assert loaded.model.training  # the mode is restored
    batch = torch.tensor([ids[0], ids[0]])
    with router.single("t", rows=2):
        loaded.model(input_ids=batch).logits.sum().backward()
    b_grads = [layer.lora_b("t").weight.grad for layer in adapter.layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)


def test_a_base_its_backend_quantized_has_repacking_switched_off(base_dir):
    """A backend that quantizes with transformers' BitsAndBytesConfig leaves bitsandbytes' default
    (repacking on); loading through the core switches it off, so generation cannot break training."""
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    from mlora_core.plugin_api.hookspecs import hookimpl
    from mlora_core.plugin_api.protocols import LoadedModel

    class BnbBackend:
        target_modules = ("q_proj", "v_proj")

        def validate(self, config):
            return []

        def load(self, config):
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            model = LlamaForCausalLM.from_pretrained(
                config.path, quantization_config=bnb, device_map="cpu", dtype=torch.float32
            )
            flags = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
            assert flags
            for module in flags:  # bitsandbytes' default on CPUs with AVX512-BF16 (this one may lack them)
                module.support_avx512bf16_for_cpu = True
            return LoadedModel(model, AutoTokenizer.from_pretrained(config.path), config.path)

    class BnbPlugin:
        __name__ = "bnb"

        @hookimpl
        def mlora_register_backends(self, register):
            register("bnb_llama", BnbBackend)

    host = create_plugin_manager(autoload=False, extra=[BnbPlugin()])
    loaded = load_base_model(host, BaseModelConfig(backend="bnb_llama", path=str(base_dir)))
    flags = [m for m in loaded.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(m.support_avx512bf16_for_cpu for m in flags)
    router = RowRouter()
    lora = AdapterConfig(r=2, target_modules=["q_proj"])
    adapter = host.adapters.create("lora").attach(loaded.model, "t", lora, router)
    ids = tokenize(base_dir, PROMPTS[:1])
    generate(loaded.model, router, [GenerationRequest(ids[0], "t")], GenerationSettings(max_new_tokens=2), {1}, 0)
    loaded.model.train()
    with router.single("t", rows=1):
        loaded.model(input_ids=torch.tensor(ids[:1])).logits.sum().backward()
    assert all(layer.lora_b("t").weight.grad.abs().sum() > 0 for layer in adapter.layers.values())


# --- sampling and EOS ---------------------------------------------------------------------


def test_sampling_is_reproducible_and_differs_from_greedy(base_dir, adapters):
    loaded, router = mlora_model(base_dir, {"a": adapters["a"]})
    requests = mixed_requests(tokenize(base_dir, PROMPTS), [None, "a"])

    def run(**settings: object) -> list[list[int]]:
        results = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW, **settings), {1}, 0)
        return [r.token_ids for r in results]

    hot = {"do_sample": True, "temperature": 5.0, "seed": 7}
    first = run(**hot)
    assert run(**hot) == first
    assert run(**{**hot, "seed": 8}) != first
    assert run() != first
    # each request has its own generator: a smaller batch gives the same samples
    one = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW, **hot), {1}, 0, 1)
    assert [r.token_ids for r in one] == first
    # top_p close to 0 keeps only the most likely token: greedy again
    assert run(do_sample=True, temperature=5.0, top_p=1e-6) == run()


def test_eos_stops_a_row_while_the_others_continue(base_dir, adapters):
    prompts = tokenize(base_dir, PROMPTS)
    greedy = peft_greedy(base_dir, adapters["b"], prompts)
    stop = greedy[0][2]  # a token row 0 emits as its third token
    assert any(stop not in row for row in greedy[1:])
    expected = peft_greedy(base_dir, adapters["b"], prompts, eos=stop)
    loaded, router = mlora_model(base_dir, {"b": adapters["b"]})
    requests = [GenerationRequest(p, "b") for p in prompts]
    results = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW), {stop}, 0)
    assert [r.token_ids for r in results] == expected
    assert results[0].finish_reason == "eos" and len(results[0].token_ids) <= 2
    assert {r.finish_reason for r in results[1:]} >= {"length"}


def test_native_chatglm_generates_without_a_cache_like_transformers_glm(request):
    """The native ChatGLM2/3 model has no KV cache: each token recomputes the sequence; same tokens."""
    chatglm_dir = request.getfixturevalue("tiny_chatglm_dir")
    from transformers import GlmForCausalLM

    config, weights = to_glm(chatglm_weights(TINY), TINY)
    reference = GlmForCausalLM(config).eval()
    reference.load_state_dict(weights, strict=True)
    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(backend="chatglm", path=str(chatglm_dir)))
    torch.manual_seed(0)
    prompts = [torch.randint(3, 400, (n,)).tolist() for n in (5, 9, 3)]
    requests = [GenerationRequest(p) for p in prompts]
    results = generate(loaded.model, RowRouter(), requests, GenerationSettings(max_new_tokens=6), {2}, 0)
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2)
        new = out[0, len(prompt) :].tolist()
        assert result.token_ids == (new[: new.index(2)] if 2 in new else new)


# --- loading saved adapters -------------------------------------------------------------


def test_adapter_name_infix_and_bin_weights_load(base_dir, adapters, tmp_path):
    """Keys like ``lora_A.default.weight`` and pickled ``adapter_model.bin`` (read with weights_only)."""
    variant = tmp_path / "variant"
    shutil.copytree(adapters["a"], variant)
    state = load_file(str(variant / "adapter_model.safetensors"))
    renamed = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in state.items()
    }
    save_file(renamed, str(variant / "adapter_model.safetensors"))
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a"], pickled)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(state, pickled / "adapter_model.bin")
    loaded, router = mlora_model(base_dir, {"a": adapters["a"], "infix": variant, "bin": pickled})
    ids = tokenize(base_dir, PROMPTS)
    requests = [GenerationRequest(p, name) for name in ("a", "infix", "bin") for p in ids]
    results = generate(loaded.model, router, requests, GenerationSettings(max_new_tokens=NEW), {1}, 0)
    tokens = [r.token_ids for r in results]
    assert tokens[: len(ids)] == tokens[len(ids) : 2 * len(ids)] == tokens[2 * len(ids) :]


def test_rslora_scaling_matches_peft(base_dir, tmp_path):
    directory = save_peft_adapter(base_dir, tmp_path / "rs", 5, ["q_proj", "v_proj"], r=4, use_rslora=True)
    prompts = tokenize(base_dir, PROMPTS)
    loaded, router = mlora_model(base_dir, {"rs": directory})
    results = generate(
        loaded.model, router, [GenerationRequest(p, "rs") for p in prompts], GenerationSettings(NEW), {1}, 0
    )
    assert [r.token_ids for r in results] == peft_greedy(base_dir, directory, prompts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "peft_type 'IA3': no adapter type loads it"),
    ],
)
def test_unsupported_peft_settings_are_rejected(base_dir, adapters, tmp_path, change, message):
    directory = tmp_path / "bad"
    shutil.copytree(adapters["a"], directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(MloraError, match=message):
        mlora_model(base_dir, {"bad": directory})


def test_adapter_for_another_base_is_rejected(tmp_path, adapters):
    wider = build_tiny_llama(tmp_path / "wider", hidden_size=48)
    with pytest.raises(MloraError, match=r"has shape \(4, 32\), the base model needs \(4, 48\)"):
        mlora_model(wider, {"a": adapters["a"]})


def test_adapter_type_without_load_gets_a_clear_error(base_dir, tmp_path):
    class NoLoad:
        requires_quantized_base = False
        peft_type = "NOLOAD"

        def validate(self, config, targets):
            return []

    class Plugin:
        @hookimpl
        def mlora_register_adapters(self, register):
            register("noload", NoLoad)

    directory = tmp_path / "x"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "NOLOAD"}))
    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    with pytest.raises(MloraError, match="adapter type 'noload' .* cannot load saved adapters"):
        load_adapter(host, torch.nn.Linear(2, 2), "x", directory, RowRouter())


# --- the command --------------------------------------------------------------------------


def test_cli_generates_for_a_jsonl_file_in_input_order(base_dir, adapters, tmp_path, capsys):
    from mlora_data.templates import ALPACA

    lines = [
        {"prompt": PROMPTS[0], "adapter": "a"},
        {"prompt": PROMPTS[2], "adapter": None},
        {"instruction": "Reverse the words.", "input": "apple river", "adapter": "b"},
        {"prompt": PROMPTS[1], "adapter": "a"},
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--base", str(base_dir), "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}"]
    args += ["--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", str(NEW), "--template", "alpaca"]
    assert cli_main(args) == 0
    assert "4/4 prompts" in capsys.readouterr().err

    results = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [ALPACA.prompt(PROMPTS[0]), ALPACA.prompt(PROMPTS[2]), ALPACA.prompt("Reverse the words.", "apple river")]
    texts.append(ALPACA.prompt(PROMPTS[1]))
    assert [r["prompt"] for r in results] == texts
    assert [r["adapter"] for r in results] == ["a", None, "b", "a"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for line, text in zip(results, texts, strict=True):
        adapter = adapters[line["adapter"]] if line["adapter"] else None
        (expected,) = peft_greedy(base_dir, adapter, tokenize(base_dir, [text]))
        assert line["output"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert line["new_tokens"] == len(expected)
        assert line["finish_reason"] in ("eos", "length")


def test_cli_prompt_flags_run_each_prompt_with_each_adapter(base_dir, adapters, capsys):
    args = ["generate", "--base", str(base_dir), "--adapter", f"a={adapters['a']}", "--prompt", PROMPTS[0]]
    args += ["--prompt", PROMPTS[1], "--prompt-adapter", "a", "--prompt-adapter", "base", "--max-new-tokens", "3"]
    assert cli_main(args) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in results] == [
        (PROMPTS[0], "a"),
        (PROMPTS[0], None),
        (PROMPTS[1], "a"),
        (PROMPTS[1], None),
    ]
    assert all(r["new_tokens"] <= 3 for r in results)


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (['{"prompt": "hi", "adapter": "a"}'], ["--adapter", "z=/no/such/dir"], "z=/no/such/dir.*is not a directory"),
        (['{"prompt": "hi"}', '{"prompt": "x", "adapter": "zz"}'], [], r"prompts.jsonl:2: unknown adapter 'zz'"),
        (['{"prompt": "hi"}', "", '{"prompt": "hi"'], [], r"prompts.jsonl:3: malformed JSON"),
        (['{"adapter": null}'], [], r"prompts.jsonl:1: needs a non-empty string 'prompt'"),
        (['{"prompt": "hi"}'], ["--template", "chatml"], "--template 'chatml': unknown; known: none, alpaca"),
        (['{"prompt": "hi"}'], ["--prompt-adapter", "zz", "--prompt", "x"], "--prompt-adapter 'zz': no such"),
        (['{"prompt": "hi"}'], ["--adapter", "base=/tmp"], "reserved or used twice"),
        (['{"prompt": "hi"}'], [], "--base: .*no-model does not exist"),
    ],
)
def test_cli_bad_input_fails_before_loading(base_dir, adapters, tmp_path, capsys, lines, extra, message):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(lines) + "\n")
    args = ["generate", "--base", str(tmp_path / "no-model"), "--adapter", f"a={adapters['a']}"]
    assert cli_main(args + ["--prompts", str(prompts_file), *extra]) == 2
    assert capsys.readouterr().err.startswith("mlora: error:")
    with pytest.raises(MloraError, match=message):
        _run_generate(args + ["--prompts", str(prompts_file), *extra])


def test_cli_adapter_for_another_base(tmp_path, adapters, capsys):
    wider = build_tiny_llama(tmp_path / "wider", hidden_size=48)
    assert cli_main(["generate", "--base", str(wider), "--adapter", f"a={adapters['a']}", "--prompt", "hi"]) == 2
    assert "the base model needs (4, 48)" in capsys.readouterr().err


def _run_generate(argv: list[str]) -> int:
    """The generate command without the CLI's error handling, so tests see the exception."""
    from mlora_core.cli.main import parse
    from mlora_generate.command import main

    host = create_plugin_manager(autoload=False)
    args, _ = parse(host, argv)
    return main(args, host)
