import json

import pytest
import torch
from conftest import TEXT, train_tokenizer

import larosa
from larosa.data import load_text, token_windows


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT)


def test_windows_are_consecutive_non_overlapping_from_one_tokenization(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = tokenizer(TEXT)["input_ids"]
    w = token_windows(tokenizer, str(path), 3, 50)
    assert w.shape == (3, 50) and w.dtype == torch.long
    assert w.flatten().tolist() == ids[:150]
    assert token_windows(tokenizer, str(path), None, 50).shape[0] == len(ids) // 50


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n")
    assert load_text(str(path)) == "one\n\ntwo"


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(larosa.LarosaError, match=r"t.jsonl:2: expected a JSON object with a 'text' field"):
        load_text(str(path))


def test_asking_for_more_windows_than_the_text_has_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("only a few words", encoding="utf-8")
    with pytest.raises(larosa.LarosaError, match="windows of 64, but 2 were asked for"):
        token_windows(tokenizer, str(path), 2, 64)


def test_missing_file_and_unknown_specs_are_errors():
    with pytest.raises(larosa.LarosaError, match="neither a file nor a known spec"):
        load_text("no/such/file.txt")
    with pytest.raises(larosa.LarosaError, match="unknown builtin text 'nope'"):
        load_text("builtin:nope")
