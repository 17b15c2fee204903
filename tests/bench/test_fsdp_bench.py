"""bench/fsdp.py's bookkeeping: the parameter count it divides by is the model's whether the packed storage is
buffers (one process) or parameters (FSDP), and a measured case is not run again."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fsdp  # noqa: E402

from qbara import prepare  # noqa: E402
from qbara.adapters.config import AdapterConfig  # noqa: E402
from qbara.models import tiny_llama  # noqa: E402
from qbara.nn.quantized_linear import QuantizedLinear  # noqa: E402
from qbara.quant.config import QuantConfig  # noqa: E402


def test_parameter_count_is_the_dense_models_plus_the_adapters():
    dense = tiny_llama()[0]
    expected = sum(p.numel() for p in dense.parameters())
    model = prepare(dense, QuantConfig("nf4", block_size=64), AdapterConfig(method="lora", rank=4))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters > 0 and fsdp.parameter_count(model) == expected + adapters
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.packed_as_parameters()  # as shard_model does: the count does not change
    assert fsdp.parameter_count(model) == expected + adapters


def test_a_measured_case_is_not_run_again(tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    cases.mkdir()
    fsdp.case_path(cases, "tiny-llama", 2, "local").write_text(json.dumps([{"rank": 0}]))
    spawned = []
    monkeypatch.setattr(fsdp.mp, "spawn", lambda *a, **k: spawned.append(k["nprocs"]) or pytest.fail("spawned"))
    args = argparse.Namespace(models=["tiny-llama"], ranks=[2], load="local", rerun=False)
    fsdp.measure(args, cases)
    assert spawned == []
