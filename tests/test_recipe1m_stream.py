"""The incremental JSON-array reader equals json.load and reports malformed input precisely."""

from __future__ import annotations

import json
import re

import pytest

from jointgen.data.recipe1m.jsonstream import JSONFormatError, iter_json_array

DATA = [
    {"id": f"{i:04x}", "title": "Crème brûlée ☕ " * (i % 7), "n": [1.5, -2e-3, None, True, False]}
    for i in range(60)
] + [123456789, 'a "quoted" \\ string\n', 1e300, [], {}, [[{"deep": [1, 2, {"x": "y"}]}]]]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 4096, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_stream_equals_json_load(tmp_path, chunk, indent):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(DATA, indent=indent, ensure_ascii=indent is None), "utf-8")
    assert list(iter_json_array(path, chunk)) == json.loads(path.read_text("utf-8"))


@pytest.mark.parametrize("text", ["[]", "  [ ]  \n", "[1]", '\n[\n"x" , 2 ]\n'])
def test_small_arrays(tmp_path, text):
    path = tmp_path / "a.json"
    path.write_text(text)
    assert list(iter_json_array(path, 1)) == json.loads(text)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_malformed_position_matches_json(tmp_path, chunk):
    text = json.dumps(DATA, indent=1)
    bad = text[:2000] + "}" + text[2000:]
    path = tmp_path / "layer1.json"
    path.write_text(bad)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(bad)
    with pytest.raises(JSONFormatError) as err:
        list(iter_json_array(path, chunk))
    e = err.value
    assert (e.line, e.column) == (ref.value.lineno, ref.value.colno)
    assert str(path) in str(e) and f"line {e.line} column {e.column}" in str(e)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}', "expected '['"),
        ("[1, 2", "expected ',' or ']'"),
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
        ("[1, 2] x", "extra data"),
        ('[{"a": "unterminated}]', "Unterminated string"),
        ("[1,]", "Expecting value"),
        ("", "expected '['"),
    ],
)
def test_malformed_messages(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(JSONFormatError, match=re.escape(message)) as err:
        list(iter_json_array(path, 3))
    assert str(err.value).startswith(f"{path}: malformed JSON at line 1 column ")


def test_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(DATA)[:-40])
    with pytest.raises(JSONFormatError, match="cut.json"):
        list(iter_json_array(path, 16))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_json_array(tmp_path / "nope.json"))


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(DATA[:3]).encode())
    assert list(iter_json_array(path, 4)) == DATA[:3]
