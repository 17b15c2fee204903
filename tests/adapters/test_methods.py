"""One file per method: the registry, the papers each file cites, dropout placement, the factor-init errors."""
import importlib
import re

import pytest
import torch
from torch import nn

from qbara import AdapterConfig, QbaraError
from qbara.adapters.base import lora_parameter_count
from qbara.adapters.lora import LoRALinear
from qbara.adapters.methods import METHODS, build_adapter
from qbara.adapters.qalora import matching_rank

PAPERS = {"lora": ["2106.09685", "2305.14314"], "qalora": ["2309.14717"], "qbara": ["2407.17029"],
          "qahira": ["2407.17029"]}


def test_method_list_is_the_registry():
    assert tuple(METHODS) == ("lora", "qalora", "qbara", "qahira")
    with pytest.raises(QbaraError, match="unknown adapter method"):
        AdapterConfig("dora")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_file_cites_its_paper_and_builds_its_own_layer(method):
    module = importlib.import_module(f"qbara.adapters.{method}")
    cited = re.findall(r"arXiv:(\d{4}\.\d{5})", module.__doc__)
    assert cited and set(PAPERS[method]) <= set(cited)
    layer = build_adapter(nn.Linear(64, 32), AdapterConfig(method, rank=2, pool_in=8 if "qa" in method else None))
    assert layer.method == method and type(layer).__module__ == module.__name__


@pytest.mark.parametrize("method,pooled", [("lora", 64), ("qalora", 8), ("qbara", 32), ("qahira", 8)])
def test_dropout_acts_on_the_pooled_input(method, pooled):
    """The reference code of QA-LoRA and Q-BaRA drops pooled features: dropout(P(x)), not P(dropout(x))."""
    layer = build_adapter(nn.Linear(64, 32), AdapterConfig(method, rank=2, dropout=0.5,
                                                           pool_in=8 if "qa" in method else None))
    seen = []
    layer.dropout.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[-1], out)))
    layer.train()
    x = torch.randn(3, 64)
    layer(x)
    width, dropped = seen[0]
    assert width == pooled
    # What reached the core is the pooled input with whole pooled features zeroed (or scaled by 1/(1-p)).
    pooled_x = x.unflatten(-1, (pooled, 64 // pooled)).mean(-1)
    kept = dropped != 0
    assert torch.allclose(dropped[kept], pooled_x[kept] * 2, atol=1e-6) and (~kept).any()


def test_factor_init_errors_name_the_layer():
    """These error paths raised AttributeError (the layer had no name) before they named the layer."""
    layer = LoRALinear(nn.Linear(16, 8), rank=2, scaling=1.0, name="blk.0.q")
    with pytest.raises(QbaraError, match="blk.0.q: factors .* do not fit rank 2"):
        layer.init_from_factors(torch.zeros(8, 3), torch.zeros(3, 16))
    pooled = build_adapter(nn.Linear(16, 8), AdapterConfig("qbara", rank=2), name="blk.0.k")
    with pytest.raises(QbaraError, match="blk.0.k: factors initialise plain LoRA only, not qbara"):
        pooled.init_from_factors(torch.zeros(4, 4), torch.zeros(4, 8))


def test_zero_factors_keep_a_trainable_start_with_the_same_step0_model():
    """Weights already on Q's grid decompose into Q = W and L1 = L2 = 0; A = B = 0 would never train."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=2, scaling=2.0, name="blk.0.q")
    with torch.no_grad():
        layer.init_from_factors(torch.zeros(8, 2), torch.zeros(2, 16))
    assert torch.count_nonzero(layer.delta_weight()) == 0 and layer.lora_A.weight.abs().sum() > 0
    layer(torch.randn(4, 16)).square().sum().backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0
    L1, L2 = torch.randn(8, 2), torch.zeros(2, 16)  # one zero factor: copied as given (B still gets gradient)
    with torch.no_grad():
        layer.init_from_factors(L1, L2)
    assert torch.count_nonzero(layer.lora_A.weight) == 0 and torch.equal(layer.lora_B.weight, L1 / 2 ** 0.5)


@pytest.mark.parametrize("shapes,rank,group", [([(576, 576), (192, 576), (1536, 576), (576, 1536)], 64, 32),
                                               ([(4096, 4096), (11008, 4096), (4096, 11008)], 64, 128),
                                               ([(64, 32)], 3, 8)])
def test_qalora_matching_rank_is_the_closest_count(shapes, rank, group):
    target = sum(lora_parameter_count(o, i, rank) for o, i in shapes)

    def count(r):
        return sum(r * (i // group + o) for o, i in shapes)
    best = min(range(1, 4 * rank), key=lambda r: abs(count(r) - target))
    assert abs(count(matching_rank(shapes, rank, group)) - target) == abs(count(best) - target)
