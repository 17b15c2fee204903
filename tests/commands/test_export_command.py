"""`qbara export --format gguf` with a plain LoRA adapter: base + llama.cpp LoRA GGUF beside it."""
import numpy as np
import pytest
from gguf import GGUFReader

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.adapters.io import save_adapter
from qbara.cli import main
from qbara.commands.eval import load_for_eval
from qbara.models import tiny_llama
from tests.export.test_gguf_lora import applied_weights
from tests.helpers import randomize_adapters


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    """A tiny-llama LoRA adapter (rank 4, alpha 8) on an INT4 G32 base, non-zero weights."""
    model, _ = tiny_llama()
    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("lora", rank=4, alpha=8))
    randomize_adapters(model, 3)
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "adapter", base_model_name="tiny-llama")


def test_plain_lora_goes_out_beside_the_base(lora_adapter, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", "tiny-llama", "--adapter", str(lora_adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "m.adapter.gguf"
    assert lora.is_file() and f"--lora {lora}" in printed and "lossless" in printed
    model, _ = load_for_eval("tiny-llama", str(lora_adapter))
    weights, alpha = applied_weights(out, lora, model.config)
    assert alpha == 8.0
    for name, w in weights.items():
        layer = model.get_submodule(name)
        want = (layer.base_weight() + layer.delta_weight()).double().numpy()
        assert np.abs(w - want).max() <= 1e-6 * np.abs(want).max(), name
    # its own files
    assert main(["export", "--model", "tiny-llama", "--adapter", str(lora_adapter), "--out", str(out)]) == 0


def test_adapter_out_and_allow_requantize(lora_adapter, tmp_path, capsys):
    out, lora = tmp_path / "m.gguf", tmp_path / "x" / "lora.gguf"
    args = ["export", "--model", "tiny-llama", "--adapter", str(lora_adapter), "--out", str(out)]
    assert main([*args, "--adapter-out", str(lora)]) == 0 and lora.is_file()
    assert main([*args, "--adapter-out", str(out)]) == 2
    assert "--adapter-out" in capsys.readouterr().err
    # --allow-requantize keeps its meaning: one file, the adapter merged and re-quantized
    merged = tmp_path / "merged.gguf"
    assert main(["export", "--model", "tiny-llama", "--adapter", str(lora_adapter), "--out", str(merged),
                 "--allow-requantize"]) == 0
    assert "LOSSY" in capsys.readouterr().out and not (tmp_path / "merged.adapter.gguf").exists()
    assert not any(t.name.endswith(".lora_a") for t in GGUFReader(str(merged)).tensors)


def test_foreign_adapter_file_is_refused(lora_adapter, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    (tmp_path / "m.adapter.gguf").write_bytes(b"someone else's adapter")
    args = ["export", "--model", "tiny-llama", "--adapter", str(lora_adapter), "--out", str(out)]
    assert main(args) == 2
    assert "not written by qbara" in capsys.readouterr().err
    assert (tmp_path / "m.adapter.gguf").read_bytes() == b"someone else's adapter"
    assert not out.exists()  # refused before anything is written


def test_dense_type_writes_a_dense_model_as_floats(tmp_path, capsys):
    """A dense model is refused without --allow-requantize or --dense-type; --dense-type f32 writes its linears
    as F32, exactly the model's weights."""
    from gguf import GGMLQuantizationType

    out = tmp_path / "dense.gguf"
    assert main(["export", "--model", "tiny-llama", "--out", str(out)]) == 2
    assert "dense_type" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-llama", "--out", str(out), "--dense-type", "f32"]) == 0
    model, _ = tiny_llama()
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == GGMLQuantizationType.F32
    want = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(down.data).reshape(want.shape), want)
