"""SmolLM2 round trip: INT4 G32 + QA-HiRA, merged into the quantized base, exported as GGUF, compared
with the shipped SmolLM2 Q4_1 file byte by byte and loaded back through transformers."""
import numpy as np
import pytest
import torch
from gguf import GGUFReader

import qbara
from qbara import AdapterConfig, QuantConfig
from qbara.export import export_gguf
from qbara.export.tokenizer import fields_from_hf


@pytest.fixture(scope="module")
def shipped():
    from qbara.models.smollm2 import smollm2_gguf_path

    path = smollm2_gguf_path()
    return path, GGUFReader(str(path))


def _data_bytes(reader):
    return sum(int(t.n_bytes) for t in reader.tensors)


@pytest.mark.slow
def test_smollm2_export_reproduces_the_shipped_gguf(smollm2_fresh, shipped, tmp_path):
    model, tokenizer = smollm2_fresh
    qbara.prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=8))  # M = 0
    qbara.merge(model, into="quantized")
    out = tmp_path / "smollm2-qahira.gguf"
    report = export_gguf(model, tokenizer, out)
    print("\n" + report.summary())
    assert report.lossless and len(report.exact_q4_1) == 210
    assert report.embedding_error == 0.0  # the embedding came from the shipped Q8_0: reproduced exactly
    assert report.tokenizer_source.startswith("copied from")

    ship_path, ship = shipped
    mine = GGUFReader(str(out))
    theirs = {t.name: t for t in ship.tensors}
    ours = {t.name: t for t in mine.tensors}
    assert set(ours) == set(theirs)
    exact = {"Q4_1": 0, "other": 0}
    for name, t in theirs.items():
        o = ours[name]
        assert o.tensor_type == t.tensor_type, name
        assert tuple(o.shape) == tuple(t.shape), name
        same = np.array_equal(np.asarray(o.data), np.asarray(t.data))
        exact["Q4_1" if t.tensor_type.name == "Q4_1" else "other"] += same
    print(f"byte-identical tensors: {exact['Q4_1']}/210 Q4_1, {exact['other']}/62 Q8_0 + F32")
    # INT4 G32 re-quantization of the dequantized shipped weights reproduces the grid.
    assert exact["Q4_1"] >= 200
    assert exact["other"] == 62
    # Same tensor data, so the files differ only by their metadata.
    assert _data_bytes(mine) == _data_bytes(ship)
    size_diff = out.stat().st_size - ship_path.stat().st_size
    assert size_diff == mine.data_offset - ship.data_offset
    assert abs(size_diff) < 4096
    print(f"sizes: shipped {ship_path.stat().st_size} B, exported {out.stat().st_size} B ({size_diff:+d} B)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.context_length"):
        assert mine.fields[key].contents() == ship.fields[key].contents(), key

    loaded, tok = qbara.load_model(str(out))
    ids = tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert tok("To be, or not to be").input_ids == tokenizer("To be, or not to be").input_ids


@pytest.mark.slow
def test_tokenizer_metadata_built_from_hf_matches_the_shipped_file(smollm2, shipped):
    _, tokenizer = smollm2
    _, ship = shipped
    built = fields_from_hf(tokenizer, 49152).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert list(np.atleast_1d(built[key][0])) == list(np.atleast_1d(ship.fields[key].contents())), key
