"""The alpaca loader: template, masking, cutoff, held-out split, bad input."""

from __future__ import annotations

import pytest
from conftest import alpaca_records, write_jsonl

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_data.alpaca import AlpacaLoader, read_records
from mlora_data.templates import ALPACA


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _load(tmp_path, tokenizer, records, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return AlpacaLoader().load(DataConfig(path=str(path), **{"val_set_size": 0, **kw}), tokenizer, seed=0)


def test_prompt_is_masked_and_response_ends_with_eos(tmp_path, tokenizer):
    record = {"instruction": "Reverse the words.", "input": "apple river", "output": "river apple"}
    sample = _load(tmp_path, tokenizer, [record]).train[0]
    prompt_len = len(tokenizer(ALPACA.prompt(record["instruction"], record["input"]))["input_ids"])
    assert sample.labels[:prompt_len] == (IGNORE_INDEX,) * prompt_len
    assert sample.labels[prompt_len:] == sample.input_ids[prompt_len:]
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.input_ids[prompt_len:-1]) == "river apple"


def test_train_on_inputs_learns_the_prompt_too(tmp_path, tokenizer):
    sample = _load(tmp_path, tokenizer, alpaca_records(1, 0), train_on_inputs=True).train[0]
    assert sample.labels == sample.input_ids


def test_cutoff_len_truncates_and_drops_examples_without_response(tmp_path, tokenizer):
    outputs = ["river apple", "apple", "planet garden window"]
    records = [{"instruction": "Reverse the words.", "input": "apple river", "output": o} for o in outputs]
    full = _load(tmp_path, tokenizer, records).train
    prompt_len = len(tokenizer(ALPACA.prompt(records[0]["instruction"], records[0]["input"]))["input_ids"])
    cut = _load(tmp_path, tokenizer, records, cutoff_len=prompt_len + 1).train
    assert all(len(s) == prompt_len + 1 for s in cut)
    assert len(full[0]) > prompt_len + 1
    with pytest.raises(DataError, match="no example has a response token"):
        _load(tmp_path, tokenizer, records, cutoff_len=prompt_len - 1)


def test_held_out_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    records = alpaca_records(30, 0)
    a = _load(tmp_path, tokenizer, records, val_set_size=0.2)
    b = _load(tmp_path, tokenizer, records, val_set_size=0.2)
    assert len(a.eval) == 6 and len(a.train) == 24
    assert a.eval == b.eval
    assert _load(tmp_path, tokenizer, records, val_set_size=5).eval.__len__() == 5


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instruction": "x", "output": "y"}\nnot json\n', r"d.jsonl:2: malformed JSON"),
        ('{"instruction": "x"}\n', r"d.jsonl:1: missing or non-string 'output'"),
        ("[1, 2]\n", r"d.jsonl:1: expected an object"),
        ("", r"no records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_json_list_files_are_read(tmp_path):
    import json

    path = tmp_path / "d.json"
    path.write_text(json.dumps(alpaca_records(3, 0)))
    assert len(read_records(path)) == 3
