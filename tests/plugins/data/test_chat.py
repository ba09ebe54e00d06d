"""The chat loader and the ``chat`` template: the tokenizer's own chat template, assistant turns learned.

The templates below are written here in the style of two families' shipped templates
(Qwen2's ChatML and Gemma's turn markers), over a byte-level BPE tokenizer trained here with
those families' special tokens; no hub access.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import CHATML, WORDS, alpaca_records, write_jsonl

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.evaluation.accuracy import answer_matches, question_and_answer
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_data.alpaca import AlpacaLoader
from mlora_data.chat import ChatLoader, read_conversations

#: Gemma's: BOS, the system prompt folded into the first user turn, role ``model`` for the
#: assistant, trimmed content, strict user/model alternation.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

#: No end-of-turn marker at all: the loader appends EOS to the last assistant turn.
PLAIN = (
    "{%- for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}"
)

#: Like Qwen3's: earlier assistant turns lose their reasoning, so a turn renders differently
#: once another follows it (not prefix-stable).
REWRITING = (
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
#: Per template: the tokenizer's BOS, EOS and pad tokens (as the family's tokenizer sets them)
#: and what the template closes an assistant turn with.
FAMILIES: dict[str, tuple[str, dict[str, str], str]] = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>\n"),
    "gemma": (GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, "<end_of_turn>\n"),
}

SYSTEM = "Answer in reverse order."


@pytest.fixture(scope="module")
def bpe() -> Any:
    from tokenizers import ByteLevelBPETokenizer

    corpus = [" ".join(WORDS), "system user assistant model Answer in reverse order. Reverse the words."] * 5
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=SPECIAL)
    return trained._tokenizer


def make_tokenizer(bpe: Any, template: str | None, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **(special or {"eos_token": "<|endoftext|>"}))
    tokenizer.chat_template = template
    return tokenizer


def family_tokenizer(bpe: Any, name: str) -> Any:
    template, special, _ = FAMILIES[name]
    return make_tokenizer(bpe, template, **special)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, bpe: Any) -> tuple[Any, str]:
    """(tokenizer with the family's chat template, the template's end-of-turn text)."""
    return family_tokenizer(bpe, request.param), FAMILIES[request.param][2]


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def rendered(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return ids(tokenizer, text)


def learned_runs(sample: Any) -> list[list[int]]:
    """The learned labels, as runs of consecutive learned positions."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in sample.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def chat(*turns: str, system: str | None = SYSTEM) -> dict[str, Any]:
    """A record: ``turns`` alternate user, assistant, user, ..."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def load(tmp_path: Path, tokenizer: Any, records: list[dict[str, Any]], **kw: Any) -> Any:
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(path=str(path), type="chat", **{"val_set_size": 0, **kw})
    return ChatLoader().load(config, tokenizer, seed=0)


def test_learned_tokens_are_the_assistant_content_and_the_end_of_turn(tmp_path, family):
    tokenizer, closing = family
    record = chat("Reverse the words: apple river", "river apple")
    sample = load(tmp_path, tokenizer, [record]).train[0]
    prompt = rendered(tokenizer, record["messages"][:-1], generation_prompt=True)
    assert list(sample.input_ids) == rendered(tokenizer, record["messages"])
    assert sample.labels[: len(prompt)] == (IGNORE_INDEX,) * len(prompt)  # system, user, scaffolding
    assert list(sample.input_ids[: len(prompt)]) == prompt
    assert learned_runs(sample) == [ids(tokenizer, "river apple") + ids(tokenizer, closing)]


@pytest.mark.parametrize(
    "name, prompt",
    [
        (
            "chatml",
            "<|im_start|>system\nAnswer in reverse order.<|im_end|>\n"
            "<|im_start|>user\nReverse: apple river<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "gemma",
            "<bos><start_of_turn>user\nAnswer in reverse order.\n\nReverse: apple river<end_of_turn>\n"
            "<start_of_turn>model\n",
        ),
    ],
)
def test_the_text_learned_and_not(tmp_path, bpe, name, prompt):
    tokenizer = family_tokenizer(bpe, name)
    sample = load(tmp_path, tokenizer, [chat("Reverse: apple river", "river apple")]).train[0]
    unlearned = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(unlearned) == prompt
    assert [tokenizer.decode(run) for run in learned_runs(sample)] == ["river apple" + FAMILIES[name][2]]


def test_every_assistant_turn_is_learned_and_nothing_between(tmp_path, family):
    tokenizer, closing = family
    record = chat("Reverse: apple river", "river apple", "Reverse: planet garden window", "window garden planet")
    sample = load(tmp_path, tokenizer, [record]).train[0]
    assert learned_runs(sample) == [
        ids(tokenizer, "river apple") + ids(tokenizer, closing),
        ids(tokenizer, "window garden planet") + ids(tokenizer, closing),
    ]
    assert list(sample.input_ids) == rendered(tokenizer, record["messages"])


def test_messages_after_the_last_assistant_turn_are_dropped(tmp_path, family):
    tokenizer, _ = family
    record = chat("Reverse: apple river", "river apple", "Thanks!")
    sample = load(tmp_path, tokenizer, [record]).train[0]
    assert list(sample.input_ids) == rendered(tokenizer, record["messages"][:-1])


def test_a_template_without_end_of_turn_tokens_gets_eos(tmp_path, bpe):
    tokenizer = make_tokenizer(bpe, PLAIN)
    record = chat("Reverse: apple river", "river apple", "Reverse: planet garden", "garden planet", system=None)
    sample = load(tmp_path, tokenizer, [record]).train[0]
    assert list(sample.input_ids) == rendered(tokenizer, record["messages"]) + [tokenizer.eos_token_id]
    eos = tokenizer.eos_token_id
    assert learned_runs(sample) == [ids(tokenizer, " river apple\n"), ids(tokenizer, " garden planet\n") + [eos]]


def test_a_generation_prompt_that_merges_with_the_answer_is_refused(tmp_path, bpe):
    """ "Assistant: " ends in a space, which byte-level BPE joins to the answer's first word."""
    tokenizer = make_tokenizer(bpe, PLAIN.replace("'Assistant:'", "'Assistant: '"))
    with pytest.raises(DataError, match=r"d\.jsonl:1: before messages\[1\]: .* not prefix-stable in tokens: .*'river"):
        load(tmp_path, tokenizer, [chat("Reverse: apple river", "river apple", system=None)])


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, bpe):
    tokenizer = make_tokenizer(bpe, REWRITING)
    records = [chat("Hi", "apple"), chat("Reverse: apple river", "<think>easy</think>river apple", "More?", "no")]
    with pytest.raises(DataError, match=r"d\.jsonl:2: after messages\[2\]: the chat template .* not prefix-stable: "):
        load(tmp_path, tokenizer, records)


def test_a_conversation_the_template_refuses_names_its_line(tmp_path, bpe):
    tokenizer = family_tokenizer(bpe, "gemma")  # refuses two user turns in a row
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    records = [chat("Hi", "apple"), {"messages": twice}]
    with pytest.raises(DataError, match=r"d\.jsonl:2: the chat template .* refused the conversation: .*alternate"):
        load(tmp_path, tokenizer, records)


def test_a_tokenizer_without_a_chat_template_is_a_data_error(tmp_path, bpe):
    tokenizer = make_tokenizer(bpe, None)
    tokenizer.name_or_path = "models/base-llm"
    with pytest.raises(DataError, match=r"tokenizer of models/base-llm has none.*data\.type alpaca"):
        load(tmp_path, tokenizer, [chat("Hi", "apple")])
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(2, 0))
    with pytest.raises(DataError, match=r"template chat renders with the tokenizer's chat template"):
        AlpacaLoader().load(DataConfig(path=str(path), template="chat", val_set_size=0), tokenizer, seed=0)


def test_cutoff_len_truncates_and_drops_conversations_without_learned_tokens(tmp_path, family):
    tokenizer, _ = family
    records = [chat("Reverse: apple river", answer) for answer in ("river apple", "apple", "planet garden window")]
    prompt_len = len(rendered(tokenizer, records[0]["messages"][:-1], generation_prompt=True))
    cut = load(tmp_path, tokenizer, records, cutoff_len=prompt_len + 1).train
    assert [len(s) for s in cut] == [prompt_len + 1] * 3
    assert [s.labels[-1] for s in cut] == [s.input_ids[-1] for s in cut] != [IGNORE_INDEX] * 3
    longer = [chat("Reverse the words: apple river planet garden window", "window"), *records]
    assert len(load(tmp_path, tokenizer, longer, cutoff_len=prompt_len + 1).train) == 3  # the first is dropped
    with pytest.raises(DataError, match="no conversation has an assistant token left within cutoff_len"):
        load(tmp_path, tokenizer, records, cutoff_len=prompt_len)


def test_train_on_inputs_learns_every_token(tmp_path, family):
    tokenizer, _ = family
    sample = load(tmp_path, tokenizer, [chat("Hi", "apple")], train_on_inputs=True).train[0]
    assert sample.labels == sample.input_ids


def test_a_single_turn_sample_splits_into_the_prompt_and_the_answer_for_exact_match(tmp_path, family):
    tokenizer, closing = family
    record = chat("Reverse: apple river", "river apple")
    sample = load(tmp_path, tokenizer, [record], exact_match=True).train[0]
    prompt, answer = question_and_answer(sample, tokenizer.eos_token_id)
    assert prompt == rendered(tokenizer, record["messages"][:-1], generation_prompt=True)
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "river apple"
    assert answer_matches(tokenizer, ids(tokenizer, "river apple") + ids(tokenizer, closing), answer)
    assert not answer_matches(tokenizer, ids(tokenizer, "apple river") + ids(tokenizer, closing), answer)


def test_exact_match_refuses_multi_turn_conversations(tmp_path, family):
    tokenizer, _ = family
    records = [chat("Hi", "apple"), chat("Hi", "apple", "And?", "river")]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(path=str(path), type="chat", exact_match=True, val_set_size=0)
    problems = ChatLoader().validate(config)
    assert len(problems) == 1 and re.search(r"^exact_match: .*d\.jsonl:2 has 2 assistant turns", problems[0])
    with pytest.raises(DataError, match=r"d\.jsonl:2 has 2 assistant turns"):
        ChatLoader().load(config, tokenizer, seed=0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", r"d\.jsonl:2: malformed JSON"),
        ('{"conversation": []}', r"d\.jsonl:2: expected an object with 'messages'"),
        ('{"messages": []}', r"d\.jsonl:2: 'messages' must be a non-empty list"),
        ('{"messages": "hi"}', r"d\.jsonl:2: 'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', r"d\.jsonl:2: messages\[0\]: expected an object with 'role' and 'content'"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', r"d\.jsonl:2: messages\[0\]: role 'tool' is not one of"),
        ('{"messages": [{"content": "x"}]}', r"d\.jsonl:2: messages\[0\]: missing 'role'"),
        ('{"messages": [{"role": "user"}]}', r"d\.jsonl:2: messages\[0\]: missing 'content'"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}',
            r"d\.jsonl:2: messages\[1\]: 'content' must be a string, got int",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"d\.jsonl:2: no assistant turn"),
    ],
)
def test_malformed_lines_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("Hi", "apple")) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_conversations(path)
    problems = ChatLoader().validate(DataConfig(path=str(path), type="chat", val_set_size=0))
    assert len(problems) == 1 and re.search(f"^path: .*{message}", problems[0])


def test_json_list_files_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([chat("Hi", "apple"), {"messages": [{"role": "user", "content": 1}]}]))
    with pytest.raises(DataError, match=r"d\.json: record 1: messages\[0\]: 'content' must be a string"):
        read_conversations(path)
    path.write_text(json.dumps([chat("Hi", "apple")] * 3))
    assert len(read_conversations(path)) == 3


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({}, None),  # the schema's default template: read as "not set"
        ({"template": "chat"}, None),
        ({"template": "vicuna"}, "template: the chat loader renders with the tokenizer's chat template"),
        ({"options": {"system": "x"}}, "options: the chat loader takes no options"),
    ],
)
def test_validate_accepts_only_the_chat_template(tmp_path, settings, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "apple")] * 3)
    problems = ChatLoader().validate(DataConfig(path=str(path), type="chat", val_set_size=0, **settings))
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem)


def test_alpaca_records_with_the_chat_template(tmp_path, family):
    tokenizer, closing = family
    records = [
        {"instruction": "Reverse the words.", "input": "apple river", "output": "river apple"},
        {"instruction": "Reverse: planet garden", "input": "", "output": "garden planet"},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    config = DataConfig(path=str(path), template="chat", val_set_size=0)
    assert AlpacaLoader().validate(config) == []
    with_input, without_input = AlpacaLoader().load(config, tokenizer, seed=0).train
    for sample, question, answer in (
        (with_input, "Reverse the words.\n\napple river", "river apple"),
        (without_input, "Reverse: planet garden", "garden planet"),
    ):
        prompt = rendered(tokenizer, [{"role": "user", "content": question}], generation_prompt=True)
        assert list(sample.input_ids[: len(prompt)]) == prompt
        assert sample.labels[: len(prompt)] == (IGNORE_INDEX,) * len(prompt)
        assert list(sample.labels[len(prompt) :]) == ids(tokenizer, answer) + ids(tokenizer, closing)


def test_alpaca_with_the_chat_template_ends_with_eos_when_the_template_has_no_end_of_turn(tmp_path, bpe):
    tokenizer = make_tokenizer(bpe, PLAIN)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Reverse: apple river", "output": "river apple"}])
    sample = AlpacaLoader().load(DataConfig(path=str(path), template="chat", val_set_size=0), tokenizer, 0).train[0]
    assert learned_runs(sample) == [ids(tokenizer, " river apple\n") + [tokenizer.eos_token_id]]


def test_alpaca_validate_names_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(3, 0))
    problems = AlpacaLoader().validate(DataConfig(path=str(path), template="vicuna", val_set_size=0))
    assert problems == ["template: unknown template 'vicuna'; known: alpaca, chat"]


def test_the_chat_loader_is_registered(host):
    assert isinstance(host.data_loaders.create("chat"), ChatLoader)


def test_random_chat_files_raise_only_data_errors(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=6)
    message = st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["system", "user", "assistant", "tool"]) | scalars, "content": scalars}
    )
    record = st.fixed_dictionaries({}, optional={"messages": st.lists(message | scalars, max_size=4) | scalars})

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(lines=st.lists(record.map(json.dumps) | st.text(max_size=20), max_size=5))
    def check(lines: list[str]) -> None:
        path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
        path.write_text("\n".join(lines))
        try:
            conversations = read_conversations(path)
        except DataError:
            return
        assert all(c.assistant_turns >= 1 for c in conversations)

    check()


# --- end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, bpe: Any) -> Path:
    """A 2-layer random LLaMA whose tokenizer ships the ChatML template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("chat-llama")
    tokenizer = family_tokenizer(bpe, "chatml")
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def test_a_chat_job_trains_and_saves_its_adapter(make_config, host, tmp_path, chat_llama_dir):
    from conftest import job

    from mlora_core.config.schema import load_config
    from mlora_core.training.engine import run

    records = [chat(f"Reverse: {r['input']}", r["output"]) for r in alpaca_records(24, 0)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    spec = job("talk", path, data_opts={"type": "chat", "exact_match": True})
    config = load_config(make_config([spec], base_model={"path": str(chat_llama_dir)}))
    summary = run(config, host)["jobs"][0]
    assert summary["status"] == "completed", summary.get("error")
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["eval_loss_after"])
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert (Path(config.output_dir) / "talk" / "adapter_model.safetensors").is_file()
