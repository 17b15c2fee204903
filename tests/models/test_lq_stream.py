"""LQ-LoRA and LoftQ streamed from a checkpoint's shards equal the dense-model paths bit for bit, and hold one
target matrix per worker at a time."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from qbara import AdapterConfig, LQConfig, QbaraError, QuantConfig, lq_prepare, prepare
from qbara.cli import main
from qbara.lq.configs import qlora_config
from qbara.lq.fisher import save_fisher
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.targets import linear_layer_names
from tests.helpers import TargetReads, mapped_files

CONFIGS = [qlora_config(b) for b in (2, 3, 4)]
SMALL = dict(configs=CONFIGS, table_iters=2, max_iters=3, progress=False)
IDS = torch.tensor([[1, 7, 42, 3, 9, 100, 5]])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def _folder(tmp_path, dtype=torch.bfloat16, **kw):
    model, tokenizer = tiny_llama(seed=0, **kw)
    folder = tmp_path / f"tiny-{str(dtype)[6:]}-{sorted(kw.items())}"
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _assert_same_model(eager, streamed, storage):
    expected, got = eager.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key].to(value.dtype), value), key  # packed Q, factors, every other weight
        if value.is_floating_point() and key.endswith(("norm.weight", "embed_tokens.weight")):
            assert got[key].dtype == storage, key  # the checkpoint's dtype, never an fp32 copy
    assert streamed.qbara.base_fingerprint == eager.qbara.base_fingerprint
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, eager(IDS).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_lq_lora_equals_lq_prepare_on_the_dense_model(dtype, tmp_path):
    folder = _folder(tmp_path, dtype)
    eager, _ = load_model(str(folder))
    lq_prepare(eager, 3.0, 4, **SMALL)
    streamed = lq_prepare(folder, 3.0, 4, **SMALL)
    _assert_same_model(eager, streamed, dtype)
    assert streamed.qbara.lq.to_dict() == eager.qbara.lq.to_dict()  # allocation, errors, dense fingerprint
    assert streamed.qbara.loaded_quant is None  # its Q is no plain quantization of the checkpoint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nothing_of_the_shards_stays_mapped_after_streaming(dtype, tmp_path):
    folder = _folder(tmp_path, dtype)
    model = lq_prepare(folder, 3.0, 4, **SMALL)
    assert mapped_files(folder) == []  # the kept weights are the process's own copies, not views into the shards
    assert model.model.norm.weight.dtype == dtype


def test_streamed_lq_lora_reads_a_fisher_file_like_the_dense_path(tmp_path):
    folder = _folder(tmp_path)
    eager, _ = load_model(str(folder))
    gen = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(eager.get_submodule(n).weight.shape, generator=gen)
              for n in linear_layer_names(eager, "all-linear")}
    save_fisher(fisher, tmp_path / "fisher.safetensors")
    lq_prepare(eager, 3.0, 4, fisher, **SMALL)
    streamed = lq_prepare(folder, 3.0, 4, tmp_path / "fisher.safetensors", **SMALL)
    assert streamed.qbara.lq.fisher
    _assert_same_model(eager, streamed, torch.bfloat16)


def test_streamed_loftq_equals_prepare_with_loftq_init(tmp_path):
    """Adapters on the attention projections only: LoftQ there, plain NF4 on the MLP, both paths alike."""
    folder = _folder(tmp_path)
    quant = QuantConfig("nf4", 32)
    eager, _ = load_model(str(folder))
    prepare(eager, quant, AdapterConfig("lora", rank=4, alpha=8.0, init="loftq", loftq_iters=2,
                                        target_modules=["q_proj", "v_proj"]))
    streamed = prepare(folder, LQConfig(configs=quant, method="loftq", loftq_iters=2),
                       AdapterConfig("lora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    _assert_same_model(eager, streamed, torch.bfloat16)


def test_each_worker_holds_one_target_matrix_at_a_time(tmp_path, monkeypatch):
    """The streaming contract over all three passes (table, decompositions, load): with one worker, when a
    target weight is read from the file no earlier one is still alive."""
    folder = _folder(tmp_path, layers=3)
    reads = TargetReads().install(monkeypatch)
    lq_prepare(folder, 3.0, 4, workers=1, **SMALL)
    assert reads.reads >= 3 * 21  # each of the 21 matrices read in every pass (digest, table, decomposition, load)
    assert reads.worst == 0


def test_lq_command_streams_a_folder_to_the_same_outputs(tmp_path, capsys):
    """`qbara lq` on a safetensors folder streams it and writes what the in-memory path writes for the same
    weights (tiny-llama built in memory)."""
    folder = _folder(tmp_path, torch.float32)
    args = ["lq", "--rank", "4", "--budget", "3.0", "--configs", "qlora", "--table-iters", "2", "--max-iters", "3"]
    assert main([*args, "--model", str(folder), "--out", str(tmp_path / "streamed")]) == 0
    assert main([*args, "--model", "tiny-llama", "--out", str(tmp_path / "memory")]) == 0
    streamed = json.loads((tmp_path / "streamed" / "allocation.json").read_text())
    memory = json.loads((tmp_path / "memory" / "allocation.json").read_text())
    assert streamed["streamed"] and not memory["streamed"]
    assert streamed["layers"] == memory["layers"]
    for name in ("model/qbara_model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "streamed" / name), load_file(tmp_path / "memory" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_refusals(tmp_path):
    with pytest.raises(QbaraError, match="not a folder of safetensors shards"):
        prepare("tiny-llama", LQConfig(budget=3.0), AdapterConfig(rank=4))
    folder = _folder(tmp_path)
    with pytest.raises(QbaraError, match="rank 64 exceeds"):
        prepare(folder, LQConfig(budget=3.0), AdapterConfig(rank=64))
    with pytest.raises(QbaraError, match="LoftQ takes one quantization config"):
        prepare(folder, LQConfig(method="loftq"), AdapterConfig(rank=4))


def test_calibration_model_keeps_bf16_and_computes_like_an_fp32_load(tmp_path):
    from qbara.lq.fisher import fisher_information
    from qbara.models.sources import load_calibration_model

    folder = _folder(tmp_path)
    narrow, _ = load_calibration_model(folder)
    wide, _ = load_model(str(folder))  # fp32 copy of the same bf16 values
    assert narrow.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(narrow(IDS).logits, wide(IDS).logits)
    seqs = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    a, b = fisher_information(narrow, seqs, progress=False), fisher_information(wide, seqs, progress=False)
    assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-12) for n in b)


def test_lq_command_computes_a_sharded_fisher_when_streaming(tmp_path):
    """--fisher-data on a folder: the Fisher is computed in passes of --fisher-shard-gb into DIR/fisher/, the
    outputs equal the in-memory path's, and the saved Fisher reproduces them through --fisher."""
    folder = _folder(tmp_path, torch.float32)
    args = ["lq", "--rank", "4", "--budget", "3.0", "--configs", "qlora", "--table-iters", "2", "--max-iters", "2"]
    data = ["--fisher-data", "shakespeare:hamlet", "--fisher-samples", "2", "--fisher-length", "16",
            "--fisher-shard-gb", "0.00005"]
    assert main([*args, *data, "--model", str(folder), "--out", str(tmp_path / "streamed")]) == 0
    assert main([*args, *data, "--model", "tiny-llama", "--out", str(tmp_path / "memory")]) == 0
    assert len(list((tmp_path / "streamed" / "fisher").glob("fisher-*.safetensors"))) > 2
    assert main([*args, "--fisher", str(tmp_path / "streamed" / "fisher"), "--model", str(folder),
                 "--out", str(tmp_path / "again")]) == 0
    runs = {name: json.loads((tmp_path / name / "allocation.json").read_text())
            for name in ("streamed", "memory", "again")}
    assert runs["streamed"]["fisher"]
    assert runs["streamed"]["layers"] == runs["memory"]["layers"] == runs["again"]["layers"]


def test_nf8_factors_are_what_the_adapters_start_from_and_are_counted(tmp_path):
    """factor_format=NF8: the adapters start from the NF8-rounded factors (s·B·A = NF8(L1)·NF8(L2)), in the
    streamed and the in-memory path alike, and the bits of Q plus factors are recorded."""
    import math

    from qbara.adapters.attach import adapter_layers
    from qbara.lq.factors import FACTOR_CONFIG, quantize_factors
    from qbara.models.lq import quantize_with_factors

    folder = _folder(tmp_path)
    eager, _ = load_model(str(folder))
    lq_prepare(eager, 3.0, 4, factor_format=FACTOR_CONFIG, **SMALL)
    streamed = lq_prepare(folder, 3.0, 4, factor_format=FACTOR_CONFIG, **SMALL)
    _assert_same_model(eager, streamed, torch.bfloat16)
    reference = load_model(str(folder))[0]  # the same decompositions, then NF8 by hand
    factors = quantize_with_factors(reference, streamed.qbara.lq.allocation.configs, 4, max_iters=3, progress=False)
    expected, bits = quantize_factors(factors)
    for name, layer in adapter_layers(streamed).items():
        root = math.sqrt(layer.scaling)
        assert torch.allclose(layer.lora_B.weight * root, expected[name][0], rtol=1e-6, atol=1e-12), name
        assert torch.allclose(layer.lora_A.weight * root, expected[name][1], rtol=1e-6, atol=1e-12), name
        assert not torch.allclose(layer.lora_B.weight * root, factors[name][0], rtol=1e-6, atol=1e-12), name
    settings = streamed.qbara.lq.settings
    assert settings["factor_format"] == FACTOR_CONFIG.label
    params = sum(layer.numel for layer in streamed.qbara.lq.layers.values())
    assert settings["factor_bits_per_param"] == pytest.approx(bits / params)
    assert settings["total_bits_per_param"] == pytest.approx(streamed.qbara.lq.bits_per_param + bits / params)
