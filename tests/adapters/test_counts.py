import pytest
from torch import nn

from qbara import AdapterConfig, QuantConfig
from qbara.adapters.methods import build_adapter
from qbara.adapters.qahira import auto_pool_out
from qbara.errors import QbaraError
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


LLAMA_7B = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


@pytest.mark.parametrize("name", list(LLAMA_7B))
def test_qahira_authors_preset_pools_4_by_8_on_every_llama_7b_layer(name):
    # The default chooses pool_out per layer by LoRA r64's count (brute force over the divisors): 16 on the MLP
    # layers, where the authors use 8 everywhere; the preset gives their 8. Layers on the meta device: shapes only.
    d_out, d_in = LLAMA_7B[name]
    target = 64 * (d_in + d_out)
    closest = min((p for p in range(8, d_out + 1, 8) if d_out % p == 0),
                  key=lambda p: (abs((d_out // p) * (d_in // 4) - target), -p))
    default = build_adapter(nn.Linear(d_in, d_out, bias=False, device="meta"),
                            AdapterConfig("qahira", rank=64, pool_in=4), name)
    authors = build_adapter(nn.Linear(d_in, d_out, bias=False, device="meta"),
                            AdapterConfig("qahira", rank=64, preset="authors"), name)
    assert default.pool_out == closest == (8 if name == "q_proj" else 16)
    assert (authors.pool_in, authors.pool_out) == (4, 8)
    assert tuple(authors.hira_M.weight.shape) == (d_out // 8, d_in // 4)


def test_qahira_authors_preset_folds_into_its_tile_base_and_refuses_a_contradiction():
    base = _base(128, 64, QuantConfig("int4", block_size=4, block_rows=8))
    layer = build_adapter(base, AdapterConfig("qahira", rank=4, preset="authors"))
    assert (layer.pool_in, layer.pool_out) == (4, 8) and layer.fold_problem() is None
    assert AdapterConfig("qahira", preset="authors", pool_out=8).pool_out == 8  # agreeing knobs are fine
    with pytest.raises(QbaraError, match="sets pool_out=8, but pool_out=16 was given"):
        AdapterConfig("qahira", preset="authors", pool_out=16)
    with pytest.raises(QbaraError, match="no preset 'paper': its presets are authors"):
        AdapterConfig("qahira", preset="paper")
    with pytest.raises(QbaraError, match="has no preset 'authors': it has none"):
        AdapterConfig("lora", preset="authors")
    round_trip = AdapterConfig.from_dict(AdapterConfig("qahira", preset="authors").to_dict())
    assert (round_trip.preset, round_trip.pool_in, round_trip.pool_out) == ("authors", 4, 8)
