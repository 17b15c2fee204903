"""Issue #26: damaged or hostile data files give one QbaraError naming the file, the record and the field, never
another exception from the tokenizer or the chat template, and never a silent change of the records."""
import json
import re
import warnings

import pytest

from qbara.cli import main
from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.train.data import build_examples, read_records

GOOD = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Add.", "input": "2 and 3", "output": "5"}]
CHAT = [{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llama()[1]


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _examples(path, tokenizer, on_error="fail"):
    return build_examples(read_records(str(path)), tokenizer, "auto", 512, on_error, source=str(path))


def _ids(examples):
    return [(e.input_ids, e.labels) for e in examples]


# ---------------------------------------------------------------- a data path that is a folder


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv", "data.txt"])
def test_a_data_path_that_is_a_folder_is_one_error(name, tmp_path, capsys):
    (tmp_path / name).mkdir()
    with pytest.raises(QbaraError, match=rf"{name} is a folder, not a data file; pass a \.jsonl.*dataset:PATH"):
        read_records(str(tmp_path / name))
    rc = main(["eval", "--model", "tiny-llama", "--task", "loss", "--data", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "is a folder, not a data file" in err


def test_a_saved_dataset_folder_without_the_prefix_still_reads(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(GOOD[:1]).save_to_disk(str(tmp_path / "saved"))
    assert read_records(str(tmp_path / "saved")) == GOOD[:1]


# ---------------------------------------------------------------- text fields: strings, no lone surrogate, no NUL


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_a_lone_surrogate_is_refused_naming_record_and_field(field, tmp_path, tokenizer):
    record = {"instruction": "Say hi.", "input": "x", "output": "hi", field: "a\ud800b"}
    path = _jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), json.dumps(record)])  # the \ud800 escape
    with pytest.raises(QbaraError, match=rf"data.jsonl: record 2 field '{field}' holds a lone surrogate U\+D800 "
                                         rf"at character 1"):
        _examples(path, tokenizer)


def test_a_lone_surrogate_in_text_and_chat_records(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "text.jsonl", [json.dumps({"text": "ok"}), json.dumps({"text": "\udfff"})])
    with pytest.raises(QbaraError, match=r"record 2 field 'text' holds a lone surrogate U\+DFFF at character 0"):
        _examples(path, tokenizer)
    chat = [{"messages": [{"role": "user", "content": "\ud83d"}, {"role": "assistant", "content": "hi"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    with pytest.raises(QbaraError, match=r"record 1 message 1's 'content' holds a lone surrogate"):
        _examples(tmp_path / "chat.json", tokenizer)


def test_a_nul_character_in_a_field_is_refused(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "data.jsonl", [json.dumps({"instruction": "Say hi.", "output": "a\u0000b"})])
    with pytest.raises(QbaraError, match=r"record 1 field 'output' holds a NUL character \(U\+0000\) at character "
                                         r"1; text holds none, the data is damaged"):
        _examples(path, tokenizer)


@pytest.mark.parametrize("value, shown", [(float("nan"), "float nan"), ({}, "dict {}"), (3, "int 3"),
                                          (["a"], "list ['a']")])
def test_an_input_that_is_not_text_is_refused_not_rendered(value, shown, tmp_path, tokenizer):
    path = _jsonl(tmp_path / "data.jsonl", [json.dumps({"instruction": "Say hi.", "input": value, "output": "hi"})])
    with pytest.raises(QbaraError, match="record 1 field 'input' must be a string, got " + re.escape(shown)):
        _examples(path, tokenizer)


def test_a_null_input_is_no_input(tmp_path, tokenizer):
    null = _jsonl(tmp_path / "null.jsonl", [json.dumps({"instruction": "Say hi.", "input": None, "output": "hi"})])
    absent = _jsonl(tmp_path / "absent.jsonl", [json.dumps(GOOD[0])])
    assert _ids(_examples(null, tokenizer)) == _ids(_examples(absent, tokenizer))


@pytest.mark.parametrize("field, value, error", [
    ("role", -1, r"message 1's 'role' must be a string, got int -1"),
    ("role", True, r"message 1's 'role' must be a string, got bool True"),
    ("role", [1], r"message 1's 'role' must be a string, got list \[1\]"),
    ("role", "", r"message 1's 'role' is empty \(roles are user, assistant, system\.\.\.\)"),
    ("content", -1, r"message 1's 'content' must be a string, got int -1"),
    ("content", None, r"message 1's 'content' must be a string, got NoneType None"),
    ("content", float("-inf"), r"message 1's 'content' must be a string, got float -inf"),
])
def test_a_chat_field_that_is_not_text_is_refused_before_rendering(field, value, error, tmp_path, tokenizer,
                                                                   monkeypatch):
    from qbara.templates import ChatTemplate

    def never(*args, **kwargs):
        raise AssertionError("rendered a message that is not text")

    monkeypatch.setattr(ChatTemplate, "render", never)
    records = json.loads(json.dumps(CHAT * 2))
    records[0]["messages"][0][field] = value
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(QbaraError, match=rf"data.json: record 1 {error}; fix it or set data.on_error=skip"):
        _examples(tmp_path / "data.json", tokenizer)


# ---------------------------------------------------------------- what a damaged file must not change silently


def _csv(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path, tokenizer):
    """A BOM (Windows editors write one) made the CSV's first column '\\ufeffinstruction', the first JSONL line
    invalid and a .txt file's first token a U+FEFF: it is dropped, the records are those of the file without it."""
    lines = [json.dumps(r) for r in GOOD]
    plain = _jsonl(tmp_path / "plain.jsonl", lines)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + plain.read_text(), encoding="utf-8")
    assert read_records(str(tmp_path / "bom.jsonl")) == read_records(str(plain)) == GOOD
    table = "instruction,input,output\nSay hi.,,hi\n"
    _csv(tmp_path / "plain.csv", table)
    _csv(tmp_path / "bom.csv", "\ufeff" + table)
    assert read_records(str(tmp_path / "bom.csv")) == read_records(str(tmp_path / "plain.csv"))
    assert list(read_records(str(tmp_path / "bom.csv"))[0]) == ["instruction", "input", "output"]
    (tmp_path / "plain.txt").write_text("To be, or not to be. " * 40)
    (tmp_path / "bom.txt").write_text("\ufeff" + "To be, or not to be. " * 40)
    assert read_records(str(tmp_path / "bom.txt")) == read_records(str(tmp_path / "plain.txt"))


def test_a_unicode_line_separator_inside_a_jsonl_string_is_not_a_line_break(tmp_path):
    """JSON allows a raw U+2028 / U+0085 inside a string (json.dumps(ensure_ascii=False) writes one); JSONL lines
    end at \\n only, so the record reads whole instead of as two malformed halves."""
    record = {"instruction": "one\u2028two\x85three", "output": "hi"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(str(path)) == [record]


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """DictReader let the last 'output' cell silently win over the first."""
    path = _csv(tmp_path / "data.csv", "instruction,output,output\nSay hi.,hi,bye\n")
    with pytest.raises(QbaraError, match=r"data.csv: the CSV header names column\(s\) 'output' more than once"):
        read_records(str(path))


@pytest.mark.parametrize("row, cells", [("Say hi.,,hi,surplus", 4), ("Say hi.,", 2)])
def test_a_csv_row_with_more_or_fewer_cells_than_the_header_is_a_malformed_record(row, cells, tmp_path,
                                                                                   tokenizer):
    """Extra cells went to DictReader's None key (silently dropped), missing ones became None; a truncated last
    row is one of these."""
    path = _csv(tmp_path / "data.csv", f"instruction,input,output\nAdd.,2 and 3,5\n{row}\n")
    with pytest.raises(QbaraError, match=rf"data.csv: record 2 \(CSV line 3\) has {cells} cells but the header has 3; "
                                         rf"fix it or set data.on_error=skip"):
        _examples(path, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = _examples(path, tokenizer, on_error="skip")
    assert len(kept) == 1 and "skipped 1 malformed records (numbers [2]" in str(caught[-1].message)


def test_a_truncated_csv_is_not_silently_shorter(tmp_path, tokenizer):
    text = "instruction,input,output\nSay hi.,,hi\nAdd.,2 and 3,5\n"
    path = _csv(tmp_path / "data.csv", text[:text.index("2 and") + 2])  # cut inside the last row
    with pytest.raises(QbaraError, match=r"record 2 \(CSV line 3\) has 2 cells but the header has 3"):
        _examples(path, tokenizer)


@pytest.mark.parametrize("header, name", [("instruction,INPUT,output", "INPUT"), ("instruction,in0ut,output", "in0ut"),
                                          ("instruction,inptt,output", "inptt")])
def test_a_damaged_csv_header_that_drops_a_column_is_a_notice(header, name, tmp_path, tokenizer):
    """A flipped bit in the header ('input' -> 'in0ut') left the whole column out of every example silently."""
    path = _csv(tmp_path / "data.csv", f"{header}\nAdd.,2 and 3,5\n")
    with pytest.warns(UserWarning, match=rf"data.csv: field '{name}' is not read \(the fields read are instruction, "
                                         rf"input, output, system\); did you mean 'input'\?"):
        _examples(path, tokenizer)


def test_two_jsonl_lines_merged_by_a_lost_newline_is_a_notice(tmp_path, tokenizer):
    """Bytes deleted across a line break can leave one valid record holding the keys of two."""
    path = _jsonl(tmp_path / "data.jsonl", ['{"instruction": "Add the numbers.", "itruction": "Name a colour.", '
                                            '"output": "blue"}'])
    with pytest.warns(UserWarning, match=r"field 'itruction' is not read .* did you mean 'instruction'\?"):
        _examples(path, tokenizer)


def test_extra_fields_unlike_the_format_s_pass_without_a_notice(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "data.jsonl", [json.dumps({**GOOD[1], "id": 7, "category": "math", "source": "x"})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_examples(path, tokenizer)) == 1
