"""The default LQ error table (exact: dq_mode="refine") against the reference it stands for: every config's own
decomposition run to convergence (`converged_cost`, LQ-LoRA's per-config procedure). Every table entry is the error of a
decomposition the config can hold, so the table may find a lower error than the reference run; what it must
not do is overstate the cost (which biases the ILP against that config)."""
import pytest
import torch

from qbara.lq.configs import candidate_configs
from qbara.lq.tables import converged_cost, matrix_costs

RANK = 8
TOLERANCE = 1.03  # the table's cost at most 3 % above the converged per-config decomposition


def _matrices():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(64, 128, generator=g) * 0.02
    chi2 = torch.randn(3, 64, 128, generator=g).square().sum(0)  # chi-squared, 3 degrees of freedom
    student = torch.randn(64, 128, generator=g) / torch.sqrt(chi2 / 3.0)  # Student-t (3): heavy tails
    return {"gaussian": gaussian, "student-t3": student * 0.02}


def _family_configs():
    """Every (b, B0, b0) family of the candidate set, with the finest and the coarsest storage of its scales'
    maxima (b1, B1)."""
    return [c for c in candidate_configs() if (c.dq_dtype, c.dq_block_size) in (("fp32", 16), ("bf16", 256))]


@pytest.fixture(scope="module")
def costs():
    configs = _family_configs()
    out = {}
    for name, W in _matrices().items():
        reference = torch.tensor([converged_cost(W, c, RANK) for c in configs], dtype=torch.float64)
        out[name] = (reference, matrix_costs(W, configs, rank=RANK),  # the default table
                     matrix_costs(W, configs, rank=RANK, dq_mode="shared"),
                     matrix_costs(W, configs, rank=RANK, dq_mode="warm"))
    return configs, out


@pytest.mark.parametrize("matrix", ["gaussian", "student-t3"])
def test_default_table_is_within_3_percent_of_every_familys_converged_decomposition(costs, matrix):
    """Per (b, B0, b0) family, the table's costs are on average (median over the family's configs) at most 3 %
    above the converged decomposition's, and all but a few single configs are within 3 %. (The reference
    run is itself noisy: another seed of the same procedure differs by 0.4-1.9x on single low-b0 or NF8
    configs, so no cheaper table can bound every single entry by 3 %.)"""
    configs, out = costs
    reference, table, _, _ = out[matrix]
    ratio = table / reference
    families: dict[tuple, list[float]] = {}
    for c, r in zip(configs, ratio.tolist()):
        families.setdefault((c.bits, c.block_size, c.dq_bits), []).append(r)
    assert len(families) == 48  # every (b, B0, b0) family of the candidate set is checked
    biased = {k: [round(r, 3) for r in rs] for k, rs in families.items() if torch.tensor(rs).median() > TOLERANCE}
    assert not biased, f"families whose table costs are > 3 % above the converged decomposition: {biased}"
    over = {configs[j].label: round(float(ratio[j]), 3) for j in range(len(configs)) if ratio[j] > TOLERANCE}
    assert len(over) <= 0.05 * len(configs), f"more than 5 % of the configs > 3 % above the reference: {over}"
    assert float(ratio.max()) < 1.5, over


@pytest.mark.parametrize("matrix", ["gaussian", "student-t3"])
def test_fast_approximation_is_still_offered_and_measurably_off(costs, matrix):
    configs, out = costs
    reference, table, shared, _ = out[matrix]
    ratio = shared / reference
    assert float(ratio.max()) > 1.10  # the fast table overstates some costs by more than 10 %
    assert float(ratio.median()) > float((table / reference).median())


@pytest.mark.parametrize("matrix", ["gaussian", "student-t3"])
def test_warm_table_is_close_to_the_converged_decomposition_and_never_above_the_fast_one(costs, matrix):
    """dq_mode="warm" (each family's run started from the shared run's factors): on the whole within 3 % of the
    converged decomposition (median), no config off by more than 15 %, and never above the fast table (each of
    its entries is the smaller of the two runs' errors). Measured: 9-12 of 96 configs above 3 %, so it is not
    the exact table (bench/results/lq_table_exactness.md)."""
    configs, out = costs
    reference, _, shared, warm = out[matrix]
    ratio = warm / reference
    assert float(ratio.median()) <= TOLERANCE
    assert float(ratio.max()) < 1.15, {configs[j].label: round(float(ratio[j]), 3) for j in range(len(configs))
                                       if ratio[j] > TOLERANCE}
    assert bool((warm <= shared).all())
    assert float((shared / reference).max()) > 1.5  # what it corrects: the fast table is far off somewhere
