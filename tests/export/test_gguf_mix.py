"""`write_mixed_gguf` / `qbara gguf`: the file gguf-py reads back holds the allocation's types, each linear's
blocks equal `quantize_ggml` of the checkpoint's weight under the same importance (bit for bit), and the file
fits its budget (bits/param, bytes, a llama.cpp preset). The allocation's optimality is the ILP's own test
(tests/lq/test_ilp.py::test_ilp_equals_brute_force_on_random_small_instances)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from qbara.cli import main
from qbara.data import shakespeare_text
from qbara.errors import QbaraError
from qbara.export import export_gguf
from qbara.export.gguf import LINEARS, llama_rope_permutation
from qbara.export.gguf.mix import mixed_calibration, parse_size, write_mixed_gguf
from qbara.export.gguf.presets import preset_file
from qbara.lq.filesize import FileBudget
from qbara.lq.fisher import calibration_sequences, fisher_information
from qbara.lq.imatrix import importance_matrix
from qbara.models import tiny_llama
from qbara.quant.ggml import quantize_ggml

# K-quants need rows of 256: hidden 256 (one layer); the budget tests take the 64-wide default (legacy formats).
WIDE = {"hidden": 256, "layers": 1, "heads": 4, "kv_heads": 2, "intermediate": 256}
SAMPLES, LENGTH = 4, 64


def _model(wide=True):
    return tiny_llama(seed=0, tie_word_embeddings=True, **(WIDE if wide else {}))


@pytest.fixture(scope="module")
def text():
    return shakespeare_text("macbeth")[:20000]


def _gguf_name(hf: str) -> str:
    index, _, rest = hf.removeprefix("model.layers.").partition(".")
    return f"blk.{index}.{dict(LINEARS)[rest]}.weight"


# Fisher on the 256-wide model (K-quants among the candidates), the others on the 64-wide one (seconds).
# rounding: the statistic named apart from the costs' (Fisher allocation, imatrix-weighted rounding).
@pytest.mark.parametrize("costs, wide, rounding", [("fisher", True, None), ("imatrix", False, None),
                                                   ("plain", False, None), ("fisher", False, "imatrix")])
def test_file_holds_the_allocation_quantized_from_the_checkpoint(tmp_path, text, costs, wide, rounding):
    model, tokenizer = _model(wide)
    calibration = [] if costs == "plain" else [text]
    report = write_mixed_gguf(model, tmp_path / "m.gguf", bits=4.6 if wide else 5.0, calibration=calibration, costs=costs,
                              rounding=rounding, samples=SAMPLES, length=LENGTH, tokenizer=tokenizer, progress=False)
    reference, _ = _model(wide)  # the same checkpoint, dense
    importance = None
    statistic = None if costs == "plain" else rounding or costs
    assert report.rounding == statistic
    if statistic is not None:
        sequences = calibration_sequences(tokenizer, text, SAMPLES, LENGTH, seed=0)
        importance = (fisher_information(reference, sequences, progress=False) if statistic == "fisher"
                      else importance_matrix(reference, sequences, progress=False))
    tensors = {t.name: t for t in GGUFReader(str(report.path)).tensors}
    formats = set()
    for name, layer in report.layers.items():
        t = tensors[_gguf_name(name)]
        assert t.tensor_type.name.lower() == layer["format"]
        formats.add(layer["format"])
        weight = reference.get_submodule(name).weight.detach()
        ours = quantize_ggml(weight, layer["format"], name, importance=None if importance is None
                             else importance[name]).numpy().reshape(weight.shape[0], -1)
        rows = np.asarray(t.data).reshape(weight.shape[0], -1).view(np.uint8)
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary row order (4 heads, 2 KV heads in both)
            heads = 4 if name.endswith("q_proj") else 2
            unpermuted = np.empty_like(rows)
            unpermuted[llama_rope_permutation(rows.shape[0], heads).numpy()] = rows
            rows = unpermuted
        assert np.array_equal(rows, ours), name
    assert len(formats) > 1  # a mix, not one format
    assert report.matrix_bits_per_param <= (4.6 if wide else 5.0) + 1e-9
    data = json.loads(report.path.with_suffix(".mix.json").read_text())
    assert data["layers"] == report.layers and report.path.with_suffix(".mix.png").stat().st_size > 0


def _matrix_bits(path) -> float:
    tensors = [t for t in GGUFReader(str(path)).tensors if ".attn_" in t.name or ".ffn_" in t.name]
    tensors = [t for t in tensors if len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def test_budgets_bound_the_file(tmp_path):
    model, tokenizer = _model(wide=False)
    file = FileBudget.of_model(model)
    bits = write_mixed_gguf(model, tmp_path / "bits.gguf", bits=5.0, costs="plain", tokenizer=tokenizer,
                            progress=False)
    assert _matrix_bits(bits.path) <= 5.0 + 1e-9
    file_bits = write_mixed_gguf(_model(wide=False)[0], tmp_path / "file.gguf", bits=6.0, file_budget=True, costs="plain",
                                 tokenizer=tokenizer, progress=False)
    assert 8 * file_bits.tensor_bytes / file.total_params <= 6.0 + 1e-9
    # A size between the smallest and the largest mix: the first pass leaves out the metadata, the second fits it.
    size = bits.size_bytes
    sized = write_mixed_gguf(_model(wide=False)[0], tmp_path / "size.gguf", size=size, costs="plain", tokenizer=tokenizer,
                             progress=False)
    assert sized.path.stat().st_size <= size and sized.passes == 2
    preset = preset_file(_model(wide=False)[0], "Q4_K_M")
    matched = write_mixed_gguf(_model(wide=False)[0], tmp_path / "match.gguf", match="Q4_K_M", costs="plain",
                               tokenizer=tokenizer, progress=False)
    assert matched.tensor_bytes <= preset.tensor_bytes
    assert matched.preset["tensor_bytes"] == preset.tensor_bytes


def test_formats_restrict_the_candidates(tmp_path):
    """Only the named formats are allocated; with one format every matrix holds it, and the file is export_gguf's
    of quantize_ggml in that format, bit for bit (an independent path)."""
    model, tokenizer = _model(wide=False)
    two = write_mixed_gguf(model, tmp_path / "two.gguf", bits=6.0, costs="plain", tokenizer=tokenizer,
                           progress=False, formats=["q4_0", "gguf:q8_0"])
    assert two.formats == ["q4_0", "q8_0"] and set(two.counts()) <= {"q4_0", "q8_0"}
    assert len(two.counts()) == 2  # 6 bits lies between q4_0 (4.5) and q8_0 (8.5): the ILP needs both
    one = write_mixed_gguf(_model(wide=False)[0], tmp_path / "one.gguf", bits=9.0, costs="plain",
                           tokenizer=tokenizer, progress=False, formats=["q5_0"])
    assert one.counts() == {"q5_0": len(one.layers)}
    tensors = {t.name: t for t in GGUFReader(str(one.path)).tensors}
    for name in one.layers:
        weight = _model(wide=False)[0].get_submodule(name).weight.detach()
        if ".self_attn.q_proj" in name or ".self_attn.k_proj" in name:
            continue  # permuted for llama.cpp's rope layout; the other linears are written as they are
        expected = quantize_ggml(weight, "q5_0")
        assert np.array_equal(np.asarray(tensors[_gguf_name(name)].data).reshape(-1).view(np.uint8),
                              np.asarray(expected).reshape(-1).view(np.uint8)), name


@pytest.mark.parametrize("formats, message", [(["q4_2"], "unknown GGML formats"),
                                              (["q4_k"], "none of the candidate formats")])
def test_bad_formats_are_one_error(tmp_path, formats, message):
    model, tokenizer = _model(wide=False)  # 64-wide rows: no K-quant fits
    with pytest.raises(QbaraError, match=message):
        write_mixed_gguf(model, tmp_path / "m.gguf", bits=5.0, costs="plain", tokenizer=tokenizer,
                         progress=False, formats=formats)
    assert not (tmp_path / "m.gguf").exists()


def test_match_spends_the_presets_room_beside_the_matrices(tmp_path):
    """--match on a LLaMA-3 model with 256-wide rows (tiny-llama3-256 in the preset fixture, recorded from
    llama.cpp's quantizer): the embedding and the untied head take the preset's types (Q4_K / Q6_K, not Q8_0), the
    file holds rope_freqs, so every tensor outside the matrices takes the bytes it takes in llama.cpp's file; the
    budget counts exactly the file's tensors; the tensor data stays within llama.cpp's."""
    fixture = json.loads((Path(__file__).parent.parent / "fixtures" / "llamacpp_presets.json").read_text())
    entry = fixture["tiny-llama3-256"]
    for preset in ("Q4_K_M", "Q2_K"):
        model, tokenizer = tiny_llama(seed=0, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)
        model.config.rope_parameters = dict(entry["config"]["rope_parameters"])  # what rope_freqs is written from
        expected = entry["presets"][preset]
        types = {n: expected["others"].get(n, expected["default"]) for n in
                 (t.name for t in GGUFReader(str(_any_file(tmp_path, model, tokenizer))).tensors)}
        report = write_mixed_gguf(model, tmp_path / f"{preset}.gguf", match=preset, costs="plain",
                                  tokenizer=tokenizer, progress=False)
        tensors = {t.name: t for t in GGUFReader(str(report.path)).tensors}
        assert set(tensors) == set(types) and "rope_freqs.weight" in tensors
        fixed = [n for n in tensors if not (".attn_" in n or ".ffn_" in n) or len(tensors[n].shape) < 2]
        for n in fixed:
            assert tensors[n].tensor_type.name.lower() == types[n], n
        llama_fixed = sum(_nbytes(types[n], int(tensors[n].n_elements)) for n in fixed)
        assert sum(int(tensors[n].n_bytes) for n in fixed) == llama_fixed
        assert report.tensor_bytes <= expected["tensor_bytes"]
        params = sum(int(t.n_elements) for t in tensors.values())
        assert report.file_bits_per_param * params / 8 == pytest.approx(report.tensor_bytes, abs=0.5)


def _any_file(tmp_path, model, tokenizer):
    path = tmp_path / "f32.gguf"
    if not path.exists():
        export_gguf(model, tokenizer, path, embedding_type="f32", dense_type="f32")
    return path


def _nbytes(kind: str, numel: int) -> int:
    """Bytes of `numel` weights in a GGML type, from gguf-py's block sizes."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]]
    return numel // block * size


def test_parse_size():
    assert parse_size("88MB") == 88_000_000 and parse_size("2 MiB") == 2 * 2**20 and parse_size("1234") == 1234
    for bad in ("", "-3MB", "12 parsecs", "MB"):
        with pytest.raises(QbaraError):
            parse_size(bad)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.0", "--costs", "plain"], "below the smallest file"),
    (["--match", "Q4_K_XL", "--costs", "plain"], "unknown llama.cpp preset"),
    (["--budget", "5"], "computed from calibration text"),
    (["--budget", "5", "--size", "1MB", "--costs", "plain"], "exactly one budget"),
    (["--size", "1MB", "--file-budget", "--costs", "plain"], "drop it"),
    (["--budget", "5", "--costs", "plain", "--calibration", "shakespeare:macbeth"], "plain costs use no"),
    (["--budget", "5", "--costs", "plain", "--formats", " , "], "names no format"),
    (["--budget", "5", "--costs", "plain", "--rounding", "imatrix"], "plain costs do not have"),
    (["--budget", "5", "--calibration", "shakespeare:macbeth", "--rounding", "imatrix", "--no-weighted-rounding"],
     "turns off"),
])
def test_bad_input_is_one_error(tmp_path, capsys, argv, message):
    code = main(["gguf", "--model", "tiny-llama", "--out", str(tmp_path / "m.gguf"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.gguf").exists()


def test_command_writes_the_file_and_report(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code = main(["gguf", "--model", "tiny-llama", "--budget", "5", "--calibration", "shakespeare:macbeth",
                 "--calibration", "shakespeare:othello", "--calibration-samples", "4", "--calibration-length", "32",
                 "--costs", "imatrix", "--out", str(out), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calibration_sequences"] == 4 and data["weighted_rounding"] and data["matrix_bits_per_param"] <= 5
    assert GGUFReader(str(out)).tensors and out.with_suffix(".mix.json").exists()


def test_calibration_is_shared_among_texts():
    _, tokenizer = _model()
    a, b = "a" * 500, "b" * 50
    seqs = mixed_calibration(tokenizer, [a, b], 5, 16, 0)
    firsts = [tokenizer.decode(s[:1]) for s in seqs]
    assert firsts.count("a") == 3 and firsts.count("b") == 2
    assert torch.equal(seqs[:3], calibration_sequences(tokenizer, a, 3, 16, seed=0))


def test_folder_is_streamed_to_the_same_file(tmp_path, text):
    model, tokenizer = _model(wide=False)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    kwargs = dict(bits=5.0, calibration=[text], costs="imatrix", samples=2, length=32, progress=False)
    streamed = write_mixed_gguf(str(folder), tmp_path / "streamed.gguf", **kwargs)
    in_memory = write_mixed_gguf(model, tmp_path / "memory.gguf", tokenizer=tokenizer, **kwargs)
    assert streamed.layers == in_memory.layers
    a, b = GGUFReader(str(streamed.path)).tensors, GGUFReader(str(in_memory.path)).tensors
    assert [t.name for t in a] == [t.name for t in b]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a, b))


def test_lq_rank_0_points_to_the_mix_command(tmp_path, capsys):
    code = main(["lq", "--model", "tiny-llama", "--configs", "gguf", "--rank", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "qbara gguf" in capsys.readouterr().err
