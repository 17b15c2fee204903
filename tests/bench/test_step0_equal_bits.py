"""bench/step0_equal_bits.py: total bits count the NF8 factors, windows start with the BOS only where the tokenizer
adds one, and a paired verdict needs the mean window difference beyond 2 standard errors."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import step0_equal_bits as s0  # noqa: E402

from qbara import QuantConfig  # noqa: E402
from qbara.lq.factors import FACTOR_CONFIG  # noqa: E402


def test_total_bits_add_the_factors_by_shape():
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 32, bias=False)
    configs = {"a": QuantConfig("nf4", block_size=64), "b": QuantConfig("int4", block_size=32)}
    q, total = s0.total_bits(model, configs, rank=4)
    numel = 128 * 64 + 32 * 128
    assert math.isclose(q, (configs["a"].bits_per_param * 128 * 64 + configs["b"].bits_per_param * 32 * 128) / numel)
    assert math.isclose(total - q, FACTOR_CONFIG.bits_per_param * 4 * (128 + 64 + 32 + 128) / numel)
    assert s0.total_bits(model, configs, rank=0) == (q, q)


def test_with_bos_prepends_only_a_given_bos():
    rows = torch.arange(12).view(3, 4)
    assert torch.equal(s0.with_bos(rows, None), rows)
    assert s0.with_bos(rows, 99).tolist() == [[99, 0, 1, 2], [99, 4, 5, 6], [99, 8, 9, 10]]


def test_paired_verdict_needs_two_standard_errors():
    base = [3.0, 4.0, 5.0, 6.0]
    assert s0.paired([x - 0.1 for x in base], base)["verdict"] == "lower"  # every window lower by the same 0.1
    noisy = [x - 0.1 + e for x, e in zip(base, (0.01, -0.01, 0.02, -0.02))]
    p = s0.paired(noisy, base)
    assert p["verdict"] == "lower" and math.isclose(p["ppl_ratio"], math.exp(p["mean_diff"]))
    assert s0.paired([x + e for x, e in zip(base, (0.05, -0.05, 0.04, -0.04))], base)["verdict"] == "inconclusive"
