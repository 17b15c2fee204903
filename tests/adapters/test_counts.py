import pytest
from torch import nn

from qbara import AdapterConfig, QuantConfig
from qbara.adapters.methods import build_adapter
from qbara.adapters.qahira import auto_pool_out
from qbara.nn import QuantizedLinear

SHAPES = [(64, 64), (128, 64), (64, 256), (576, 576), (1536, 576), (576, 1536), (192, 576)]


def _base(d_out, d_in, quant=None):
    linear = nn.Linear(d_in, d_out, bias=False)
    return QuantizedLinear.from_linear(linear, quant) if quant else linear


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("rank,pool", [(4, 2), (8, 2), (8, 4)])
def test_qbara_has_loras_parameter_count_at_higher_rank(d_out, d_in, rank, pool):
    lora = build_adapter(_base(d_out, d_in), AdapterConfig("lora", rank=rank))
    qbara = build_adapter(_base(d_out, d_in), AdapterConfig("qbara", rank=rank, pool=pool))
    assert lora.num_trainable == rank * (d_in + d_out)
    assert qbara.num_trainable == lora.num_trainable
    assert qbara.rank == pool * rank
    assert tuple(qbara.lora_A.weight.shape) == (pool * rank, d_in // pool)
    assert tuple(qbara.lora_B.weight.shape) == (d_out // pool, pool * rank)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_qalora_and_qahira_counts_follow_the_formulas(d_out, d_in):
    base_q = QuantConfig("int4", 32)
    qalora = build_adapter(_base(d_out, d_in, base_q), AdapterConfig("qalora", rank=8))
    assert qalora.num_trainable == 8 * (d_in // 32 + d_out)
    qahira = build_adapter(_base(d_out, d_in, base_q), AdapterConfig("qahira", rank=8))
    assert qahira.pool_in == 32
    assert qahira.num_trainable == (d_out // qahira.pool_out) * (d_in // 32)
    # The chosen pool_out is the divisor whose count is closest to LoRA's (brute force).
    target = 8 * (d_in + d_out)
    best = min(abs((d_out // p) * (d_in // 32) - target) for p in range(1, d_out + 1) if d_out % p == 0)
    assert abs(qahira.num_trainable - target) == best


def test_authors_qahira_tile_setting_on_llama_7b_projection_matches_lora_r64():
    # SPEC: lambda_in = 4, lambda_out = 8 on a 4096 x 4096 projection gives 524,288 = LoRA r = 64.
    assert (4096 // 8) * (4096 // 4) == 64 * (4096 + 4096) == 524288
    assert auto_pool_out(4096, 4096, 4, 64) == 8
    assert auto_pool_out(4096, 4096, 32, 64) == 1


def test_qahira_auto_pool_out_respects_block_rows():
    base = _base(128, 64, QuantConfig("int4", block_size=4, block_rows=8))
    layer = build_adapter(base, AdapterConfig("qahira", rank=4, pool_in=4))
    assert layer.pool_out % 8 == 0 and layer.fold_problem() is None
