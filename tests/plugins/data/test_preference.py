"""The preference loader: two sequences per record (chosen, then rejected) sharing the prompt.

Templates ``none`` and ``alpaca`` run over the tiny LLaMA's tokenizer; ``chat`` over a
byte-level BPE trained here with ChatML's special tokens and templates written in the style
of test_chat.py's (no hub access).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import CHATML, WORDS, write_jsonl

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_data.preference import Pair, PreferenceLoader, pair_sample, read_pairs
from mlora_data.templates import ALPACA

EXAMPLES = Path(__file__).parents[3] / "examples"

#: No end-of-turn marker: the loader appends EOS to the assistant turn.
PLAIN = (
    "{%- for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

RECORD = {"prompt": "Reverse: apple river", "chosen": " river apple", "rejected": " apple river"}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def bpe() -> Any:
    from tokenizers import ByteLevelBPETokenizer

    corpus = [" ".join(WORDS), "system user assistant Answer in reverse order. Reverse: apple river"] * 5
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=SPECIAL)
    return trained._tokenizer


def make_chat_tokenizer(bpe: Any, template: str) -> Any:
    """ChatML's special tokens (EOS ``<|im_end|>``, as Qwen2's tokenizer sets it) and ``template``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(bpe: Any) -> Any:
    return make_chat_tokenizer(bpe, CHATML)


def ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def load(tmp_path: Path, tokenizer: Any, records: list[dict[str, Any]], **kw: Any) -> Any:
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(path=str(path), type="preference", **{"val_set_size": 0, **kw})
    return PreferenceLoader().load(config, tokenizer, seed=0)


def check_pair(sample: Any, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
    """``sample`` is prompt + chosen, then prompt + rejected, with exactly the prompts masked."""
    masked = [IGNORE_INDEX] * len(prompt)
    assert sample.input_ids == tuple(prompt + chosen + prompt + rejected)
    assert sample.labels == tuple(masked + chosen + masked + rejected)
    assert sample.starts == (len(prompt) + len(chosen),)
    first, second = sample.sequences()
    assert first.input_ids == tuple(prompt + chosen) and first.labels == tuple(masked + chosen)
    assert second.input_ids == tuple(prompt + rejected) and second.labels == tuple(masked + rejected)


@pytest.mark.parametrize(
    "template, system, prompt_text",
    [
        ("none", None, "Reverse: apple river"),
        ("none", "Be brief.", "Be brief.\n\nReverse: apple river"),
        ("alpaca", None, ALPACA.prompt("Reverse: apple river")),
        ("alpaca", "Be brief.", "Be brief.\n\n" + ALPACA.prompt("Reverse: apple river")),
    ],
)
def test_the_prompt_begins_both_sequences_and_only_the_completions_are_learned(
    tmp_path, tokenizer, template, system, prompt_text
):
    record = {**RECORD, "system": system}
    sample = load(tmp_path, tokenizer, [record], template=template).train[0]
    eos = tokenizer.eos_token_id
    prompt = ids(tokenizer, prompt_text, special=True)
    check_pair(sample, prompt, ids(tokenizer, " river apple") + [eos], ids(tokenizer, " apple river") + [eos])
    chosen, rejected = (tokenizer.decode(s.input_ids) for s in sample.sequences())
    assert (chosen, rejected) == (prompt_text + " river apple</s>", prompt_text + " apple river</s>")


def test_the_completion_is_appended_as_it_is_under_template_none(tmp_path, tokenizer):
    """No space is added: the record's texts decide where words break."""
    record = {"prompt": "What is 17 + 25?", "chosen": "42", "rejected": "43"}
    chosen, rejected = load(tmp_path, tokenizer, [record], template="none").train[0].sequences()
    assert tokenizer.decode(chosen.input_ids) == "What is 17 + 25?42</s>"
    assert tokenizer.decode(rejected.input_ids) == "What is 17 + 25?43</s>"


@pytest.mark.parametrize("system", [None, "Answer in reverse order."])
def test_the_chat_template_learns_the_assistant_turn_and_its_end(tmp_path, chat_tokenizer, system):
    sample = load(tmp_path, chat_tokenizer, [{**RECORD, "system": system}], template="chat").train[0]
    head = f"<|im_start|>system\n{system or 'You are a helpful assistant.'}<|im_end|>\n"
    prompt = ids(chat_tokenizer, head + "<|im_start|>user\nReverse: apple river<|im_end|>\n<|im_start|>assistant\n")
    closing = ids(chat_tokenizer, "<|im_end|>\n")
    check_pair(
        sample, prompt, ids(chat_tokenizer, " river apple") + closing, ids(chat_tokenizer, " apple river") + closing
    )


def test_a_chat_template_without_end_of_turn_gets_eos(tmp_path, bpe):
    chat_tokenizer = make_chat_tokenizer(bpe, PLAIN)
    sample = load(tmp_path, chat_tokenizer, [RECORD], template="chat").train[0]
    eos = chat_tokenizer.eos_token_id
    prompt = ids(chat_tokenizer, "User: Reverse: apple river\nAssistant:")
    check_pair(
        sample, prompt, ids(chat_tokenizer, "  river apple\n") + [eos], ids(chat_tokenizer, "  apple river\n") + [eos]
    )


def test_the_chat_template_needs_a_tokenizer_that_ships_one(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"template chat renders with the tokenizer's chat template"):
        load(tmp_path, tokenizer, [RECORD], template="chat")


def test_sequences_with_different_prompts_are_refused_naming_the_record():
    pair = Pair("d.jsonl:3", "p", "a", "b")
    same = ([5, 6, 7], [False, True, True])
    with pytest.raises(DataError, match=r"^d\.jsonl:3: the prompt tokens differ between the chosen and the rejected"):
        pair_sample(pair, (same, ([4, 6, 7], [False, True, True])), DataConfig(path="d.jsonl"))
    with pytest.raises(DataError, match=r"^d\.jsonl:3: the prompt tokens differ"):
        pair_sample(pair, (same, ([5, 6, 7], [False, False, True])), DataConfig(path="d.jsonl"))


def test_cutoff_len_cuts_each_sequence_and_drops_pairs_without_a_preference_left(tmp_path, tokenizer):
    records = [
        {"prompt": "Reverse: apple river", "chosen": " river apple planet garden", "rejected": ""},
        {"prompt": "Reverse: apple river", "chosen": " river apple", "rejected": " river planet"},  # same start
    ]
    prompt = ids(tokenizer, "Reverse: apple river", special=True)
    cut = len(prompt) + 2
    assert len(load(tmp_path, tokenizer, records, template="none").train) == 2
    kept = load(tmp_path, tokenizer, records, template="none", cutoff_len=cut).train
    assert len(kept) == 1  # the second pair is prompt + " river" twice after the cut
    eos = tokenizer.eos_token_id
    check_pair(kept[0], prompt, ids(tokenizer, " river apple planet garden")[:2], [eos])
    assert len(kept[0]) == cut + len(prompt) + 1
    with pytest.raises(DataError, match=r"d\.jsonl: no pair has a learned token left in both sequences"):
        load(tmp_path, tokenizer, records, template="none", cutoff_len=len(prompt))


def test_the_held_out_split_takes_whole_pairs(tmp_path, tokenizer):
    records = [{"prompt": f"Say {w}.", "chosen": f" {w}", "rejected": " no"} for w in WORDS]
    split = load(tmp_path, tokenizer, records, template="none", val_set_size=4)
    assert len(split.eval) == 4 and len(split.train) == len(WORDS) - 4
    assert all(len(s.sequences()) == 2 for s in split.train + split.eval)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", r"d\.jsonl:2: malformed JSON"),
        ('["Reverse", " a", " b"]', r"d\.jsonl:2: expected an object with prompt, chosen, rejected"),
        ('{"prompt": "Reverse", "chosen": " a"}', r"d\.jsonl:2: missing 'rejected'"),
        ('{"prompt": 3, "chosen": " a", "rejected": " b"}', r"d\.jsonl:2: 'prompt' must be a string, got int"),
        (
            '{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}',
            r"d\.jsonl:2: 'chosen' must be a string, got list \(lists of messages are not read",
        ),
        ('{"prompt": "x", "chosen": " a", "rejected": " b", "system": 1}', r"d\.jsonl:2: 'system' must be a string"),
        ('{"prompt": "x", "chosen": " a", "rejected": " a"}', r"d\.jsonl:2: 'chosen' and 'rejected' are the same"),
    ],
)
def test_malformed_lines_are_refused_with_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + line + "\n")
    problems = PreferenceLoader().validate(DataConfig(path=str(path), type="preference", val_set_size=0))
    assert len(problems) == 1 and re.search(f"^path: .*{message}", problems[0])
    with pytest.raises(DataError, match=message):
        PreferenceLoader().load(DataConfig(path=str(path), type="preference", val_set_size=0), tokenizer, seed=0)


def test_json_list_files_and_null_systems_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{**RECORD, "system": None}, {**RECORD, "score": 7}, {**RECORD, "system": "Hi"}]))
    assert [p.system for p in read_pairs(path)] == ["", "", "Hi"]
    path.write_text(json.dumps([RECORD, {"prompt": "x"}]))
    with pytest.raises(DataError, match=r"d\.json: record 1: missing 'chosen'"):
        read_pairs(path)


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({}, None),  # the schema's default template, alpaca
        ({"template": "none"}, None),
        ({"template": "chat"}, None),
        ({"template": "vicuna"}, "template: unknown template 'vicuna'; known: alpaca, none, chat"),
        ({"exact_match": True}, "exact_match: preference pairs have no single answer to check"),
        ({"train_on_inputs": True}, "train_on_inputs: preference pairs learn their completions only"),
        ({"options": {"beta": 0.1}}, "options: the preference loader takes no options, got ['beta']"),
    ],
)
def test_validate_checks_the_settings(tmp_path, tokenizer, settings, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORD] * 3)
    config = DataConfig(path=str(path), type="preference", val_set_size=0, **settings)
    problems = PreferenceLoader().validate(config)
    if problem is None:
        assert problems == []
        return
    assert len(problems) == 1 and problems[0].startswith(problem)
    if "template" not in settings:
        with pytest.raises(DataError, match=re.escape(f"data.{problem}")):
            PreferenceLoader().load(config, tokenizer, seed=0)


def test_the_preference_loader_is_registered(host):
    assert isinstance(host.data_loaders.create("preference"), PreferenceLoader)


def test_random_preference_files_raise_only_data_errors(tmp_path_factory, tokenizer):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2)
    fields = {key: scalars for key in ("prompt", "chosen", "rejected", "system")}
    record = st.fixed_dictionaries({}, optional=fields) | scalars

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(lines=st.lists(record.map(json.dumps) | st.text(max_size=20), max_size=5))
    def check(lines: list[str]) -> None:
        path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
        path.write_text("\n".join(lines))
        config = DataConfig(path=str(path), type="preference", template="none", cutoff_len=8, val_set_size=0)
        try:
            pairs = read_pairs(path)
            samples = PreferenceLoader().load(config, tokenizer, seed=0).train
        except DataError:
            return
        assert all(isinstance(p.prompt, str) and isinstance(p.system, str) and p.chosen != p.rejected for p in pairs)
        for sample in samples:
            chosen, rejected = sample.sequences()
            assert 2 <= len(chosen) <= 8 and 2 <= len(rejected) <= 8 and chosen != rejected
            start = next(i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
            assert chosen.input_ids[:start] == rejected.input_ids[:start]  # the prompt

    check()


def test_the_example_data_is_what_its_script_writes_and_loads(tmp_path, tokenizer):
    spec = importlib.util.spec_from_file_location("make_dpo_data", EXAMPLES / "make_dpo_data.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = EXAMPLES / "data" / "arith_preference.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == script.records(400, 4)
    for pair in read_pairs(path):
        a, b = map(int, re.findall(r"\d+", pair.prompt))
        assert int(pair.chosen) == a + b != int(pair.rejected)
    config = DataConfig(path=str(path), type="preference", cutoff_len=128, val_set_size=40)
    assert PreferenceLoader().validate(config) == []
    split = PreferenceLoader().load(config, tokenizer, seed=0)
    assert (len(split.train), len(split.eval)) == (360, 40)
