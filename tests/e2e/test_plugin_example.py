"""The example third-party plugin (examples/mlora-plugin-example), imported in-process.

Its code is put on ``sys.path`` here (not installed: tests/test_plugin_example_install.py
installs it for real) and registered with ``create_plugin_manager(extra=[plugin])``.

DoRA is checked against PEFT 0.21's ``use_dora=True`` on the same tiny LLaMA with the same
A, B and magnitude values (B and m perturbed away from their init so every term is active):
fp32 logits and the gradients w.r.t. every A, B and m agree within ATOL = 1e-5 (measured on
this machine: bitwise equal, max difference 0 for logits and for every gradient).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EXAMPLE_DIR = Path(__file__).parents[2] / "examples" / "mlora-plugin-example"
sys.path.insert(0, str(EXAMPLE_DIR))

from conftest import job, write_jsonl  # noqa: E402

from mlora_core.config.schema import AdapterConfig, DataConfig, SchedulerConfig, load_config  # noqa: E402
from mlora_core.config.validation import validate_config  # noqa: E402
from mlora_core.errors import ConfigError  # noqa: E402
from mlora_core.plugin_api.host import create_plugin_manager  # noqa: E402
from mlora_core.plugin_api.routing import RowRouter, Segment  # noqa: E402
from mlora_core.plugin_api.scheduling import StepBudget  # noqa: E402
from mlora_core.training.engine import run  # noqa: E402
from mlora_plugin_example import plugin  # noqa: E402
from mlora_plugin_example.chat import IGNORE, ChatLoader  # noqa: E402
from mlora_plugin_example.dora import DoraAdapterType, DoraLinear  # noqa: E402
from mlora_plugin_example.sjf import ShortestJobFirstScheduler  # noqa: E402

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base(model_dir: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    return model


def _perturb(adapter, seed: int) -> None:
    """B away from zero, m away from ||W0||: every term of DoRA's forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _dora(model, name: str, router: RowRouter, seed: int, dropout: float = 0.0):
    torch.manual_seed(seed)
    cfg = AdapterConfig(type="dora", r=4, alpha=8, dropout=dropout, target_modules=TARGETS)
    adapter = DoraAdapterType().attach(model, name, cfg, router)
    _perturb(adapter, seed)
    return adapter


def _batch(vocab: int, rows: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(5))


def test_example_plugin_registers_its_three_components():
    host = create_plugin_manager(autoload=False, extra=[plugin])
    assert host.adapters.get("dora").plugin == host.schedulers.get("shortest_job_first").plugin
    assert "chat_markup" in host.data_loaders and "lora" in host.adapters and "alpaca" in host.data_loaders


def test_dora_matches_peft_outputs_and_gradients(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    router = RowRouter()
    ours = _base(tiny_llama_dir)
    adapter = _dora(ours, "job", router, seed=1)
    state = adapter.state_dict()
    assert sum(k.endswith(".lora_magnitude_vector") for k in state) == 2 * len(TARGETS)

    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True)
    theirs = get_peft_model(_base(tiny_llama_dir), peft_cfg)
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys

    ids = _batch(ours.config.vocab_size)
    weights = torch.randn(ids.shape + (ours.config.vocab_size,), generator=torch.Generator().manual_seed(9))
    with router.single("job", ids.shape[0]):
        ours_logits = ours(input_ids=ids).logits
    theirs_logits = theirs(input_ids=ids).logits
    (ours_logits * weights).sum().backward()
    (theirs_logits * weights).sum().backward()
    assert (ours_logits - theirs_logits).abs().max().item() <= ATOL

    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for path, layer in adapter.layers.items():
        prefix = f"base_model.model.{path}"
        pairs = [
            (layer.lora_a("job").weight, f"{prefix}.lora_A.default.weight"),
            (layer.lora_b("job").weight, f"{prefix}.lora_B.default.weight"),
            (layer.magnitude("job"), f"{prefix}.lora_magnitude_vector.default.weight"),
        ]
        for param, peft_name in pairs:
            assert param.grad is not None and param.grad.abs().max() > 0
            assert (param.grad - peft_grads[peft_name]).abs().max().item() <= ATOL, peft_name
            checked += 1
    assert checked == 3 * 2 * len(TARGETS)


def test_dora_at_init_equals_the_base(tiny_llama_dir):
    router = RowRouter()
    model = _base(tiny_llama_dir)
    ids = _batch(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        torch.manual_seed(0)
        cfg = AdapterConfig(type="dora", r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
        DoraAdapterType().attach(model, "job", cfg, router)
        with router.single("job", ids.shape[0]):
            after = model(input_ids=ids).logits
    assert (before - after).abs().max().item() <= ATOL


def test_saved_dora_adapter_loads_in_peft_with_equal_logits(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    router = RowRouter()
    model = _base(tiny_llama_dir)
    adapter = _dora(model, "job", router, seed=2)
    adapter.save(str(tmp_path / "job"), str(tiny_llama_dir))
    assert json.loads((tmp_path / "job" / "adapter_config.json").read_text())["use_dora"] is True

    ids = _batch(model.config.vocab_size)
    with torch.no_grad(), router.single("job", ids.shape[0]):
        ours = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(_base(tiny_llama_dir), str(tmp_path / "job"))
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL


@pytest.mark.parametrize("lora_first", [True, False])
def test_dora_and_lora_rows_stay_isolated(tiny_llama_dir, lora_first):
    """LoRA and DoRA jobs share wrapped layers (either attach order); each touches only its rows."""
    from mlora_lora.adapter import LoraAdapterType

    router = RowRouter()
    model = _base(tiny_llama_dir)
    adapters = {}
    order = ["lora", "dora", "dora2"] if lora_first else ["dora", "lora", "dora2"]
    for i, name in enumerate(order):
        if name == "lora":
            torch.manual_seed(i)
            cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
            adapters[name] = LoraAdapterType().attach(model, name, cfg, router)
            _perturb(adapters[name], 10 + i)
        else:
            adapters[name] = _dora(model, name, router, seed=10 + i)
    assert isinstance(model.model.layers[0].self_attn.q_proj, DoraLinear)

    ids = _batch(model.config.vocab_size, rows=6)
    segments = [Segment("lora", 0, 2), Segment("dora", 2, 4), Segment("dora2", 4, 6)]
    with router.route(segments):
        mixed = model(input_ids=ids).logits
    mixed[0:2].sum().backward()  # a loss on the LoRA job's rows only
    for name in ("dora", "dora2"):
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in adapters[name].parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in adapters["lora"].parameters())
    with torch.no_grad():
        for seg in segments:
            with router.single(seg.adapter, 2):
                alone = model(input_ids=ids[seg.start : seg.stop]).logits
            assert (alone - mixed[seg.start : seg.stop]).abs().max().item() <= ATOL

    adapters["dora"].detach()
    assert "dora" not in model.model.layers[0].self_attn.q_proj.lora_magnitude


def test_shortest_job_first_plans_the_shortest_jobs():
    def view(name, order, remaining, lengths):
        return SimpleNamespace(
            name=name, order=order, priority=0, micro_batch_size=2, waited=0,
            remaining_tokens=remaining, next_lengths=lambda: lengths,
        )  # fmt: skip

    jobs = [view("long", 0, 900, [9, 9, 9, 9]), view("short", 1, 40, [5, 5]), view("mid", 2, 300, [7, 7, 7, 7])]
    one = ShortestJobFirstScheduler(SchedulerConfig(type="shortest_job_first"))
    assert one.plan(jobs, StepBudget()) == [("short", 2)]
    two = ShortestJobFirstScheduler(SchedulerConfig(type="shortest_job_first", options={"jobs_per_step": 2}))
    assert two.plan(jobs, StepBudget()) == [("short", 2), ("mid", 2)]
    assert two.plan(jobs, StepBudget(max_tokens=20)) == [("short", 2)]  # mid's rows do not fit
    with pytest.raises(ConfigError, match="jobs_per_step"):
        ShortestJobFirstScheduler(SchedulerConfig(options={"jobs_per_step": 0}))


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "apple river"},
        {"role": "assistant", "content": "river apple"},
    ]
}


def test_chat_loader_learns_only_assistant_turns(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION] * 5)
    config = DataConfig(type="chat_markup", path=str(path), template="chatml", val_set_size=1)
    assert ChatLoader().validate(config) == []
    data = ChatLoader().load(config, tokenizer, seed=0)
    assert (len(data.train), len(data.eval)) == (4, 1)
    sample = data.train[0]
    learned = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE]
    expected = tokenizer("river apple", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert learned == expected


def test_chat_loader_reports_bad_records_and_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION, {"messages": [{"role": "user", "content": "hi"}]}])
    problems = ChatLoader().validate(DataConfig(type="chat_markup", path=str(path), template="alpaca"))
    assert any("chat.jsonl:2: no assistant message" in p for p in problems)
    assert any("template: unknown chat template 'alpaca'; known: chatml, plain" in p for p in problems)


def test_all_three_train_beside_the_builtins(make_config, data_dir, tmp_path):
    """One in-process run: a DoRA job on chat data and a LoRA job on alpaca data, scheduled SJF."""
    host = create_plugin_manager(autoload=False, extra=[plugin])
    chat = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION] * 12)
    dora = job("chat", chat, adapter={"type": "dora", "r": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    dora["data"].update(type="chat_markup", template="chatml")
    jobs = [dora, job("alpaca", data_dir / "a.jsonl")]
    config = load_config(make_config(jobs, scheduler={"type": "shortest_job_first"}))
    validate_config(config, host)
    summary = run(config, host)
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    saved = json.loads((Path(config.output_dir) / "chat" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True


def test_unknown_dora_options_fail_validation(make_config, data_dir):
    host = create_plugin_manager(autoload=False, extra=[plugin])
    bad = job("a", data_dir / "a.jsonl", adapter={"type": "dora", "options": {"x": 1}})
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.adapter\.options: the dora adapter takes no options"):
        validate_config(load_config(make_config([bad])), host)
