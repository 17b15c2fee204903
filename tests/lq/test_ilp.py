import itertools
import re

import numpy as np
import pytest
import torch

from qbara.errors import QbaraError
from qbara.lq.ilp import allocate, allocation_bits, budget_range


def _brute(costs, bits, numels, budget):
    n, m = costs.shape
    best, best_choice = np.inf, None
    for choice in itertools.product(range(m), repeat=n):
        if allocation_bits(choice, bits, numels) <= budget * (1 + 1e-12):
            total = sum(costs[i, c] for i, c in enumerate(choice))
            if total < best:
                best, best_choice = total, choice
    return best, best_choice


def test_ilp_equals_brute_force_on_random_small_instances():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(40):
        n, m = 4, 4
        bits = np.sort(rng.choice([2.03, 2.25, 2.5, 3.127, 3.5, 4.127, 4.5, 8.6], size=m, replace=False))
        # Errors fall with bits, with noise (so some configs are dominated for some matrices).
        costs = rng.uniform(0.1, 10, size=(n, 1)) * np.exp(-bits[None, :] * rng.uniform(0.3, 1.2, size=(n, 1)))
        costs *= rng.uniform(0.7, 1.3, size=(n, m))
        if trial % 5 == 0:
            costs[rng.integers(n), rng.integers(m)] = np.inf  # a config one matrix cannot use
        numels = rng.integers(1, 50, size=n) * 64
        low, high = budget_range(costs, bits, numels)
        budget = float(rng.uniform(low, high + 0.3))
        choice = allocate(costs, bits, numels, budget)
        assert len(choice) == n and all(0 <= c < m for c in choice)
        used = allocation_bits(choice, bits, numels)
        assert used <= budget * (1 + 1e-12)
        total = sum(costs[i, c] for i, c in enumerate(choice))
        best, _ = _brute(costs, bits, numels, budget)
        assert total == pytest.approx(best, rel=1e-9, abs=1e-12)
        # Without pruning the same optimum.
        unpruned = allocate(costs, bits, numels, budget, prune=False)
        assert sum(costs[i, c] for i, c in enumerate(unpruned)) == pytest.approx(best, rel=1e-9)
        checked += 1
    assert checked == 40


def test_ilp_at_the_exact_smallest_budget_and_per_matrix_bits():
    costs = np.array([[5.0, 1.0, 0.5], [4.0, 2.0, 0.1]])
    bits = np.array([2.0, 3.0, 4.0])
    numels = np.array([100, 300])
    assert allocate(costs, bits, numels, 2.0) == [0, 0]
    # 2.5 bits: one matrix can go up a level only if it is the small one.
    assert allocate(costs, bits, numels, 2.5) == [2, 0]
    # bits per (matrix, config) and torch inputs work too.
    per = torch.tensor([[2.0, 3.0, 4.0], [2.0, 2.2, 2.4]], dtype=torch.float64)
    choice = allocate(torch.tensor(costs), per, torch.tensor(numels), 2.3)
    assert choice == [1, 0]  # 2.25 bits, cost 5.0 (beats [0, 2]: exactly 2.3 bits, cost 5.1)
    assert _brute(costs, per.numpy(), numels, 2.3)[1] == tuple(choice)


def test_budget_above_the_useful_range_picks_lowest_errors():
    costs = np.array([[3.0, 1.0, 1.0], [2.0, 0.5, 0.7]])
    bits = np.array([2.0, 3.0, 4.0])
    low, high = budget_range(costs, bits, [10, 10])
    assert (low, high) == (2.0, 3.0)  # ties go to the cheaper config
    assert allocate(costs, bits, [10, 10], 8.0) == [1, 1]


def test_infeasible_budget_names_the_smallest_feasible_one():
    costs = np.ones((3, 2))
    bits = np.array([2.5, 4.0])
    numels = np.array([64, 64, 128])
    with pytest.raises(QbaraError) as info:
        allocate(costs, bits, numels, 2.0)
    msg = str(info.value)
    assert "infeasible" in msg and "2.5000" in msg
    assert re.search(r"smallest feasible budget is 2\.5000", msg)
    with pytest.raises(QbaraError, match="infeasible"):
        allocate(costs, bits, numels, float("nan"))
    with pytest.raises(QbaraError, match="no usable config"):
        allocate(np.array([[np.inf, np.inf], [1.0, 1.0]]), bits, [64, 64], 4.0)
    with pytest.raises(QbaraError, match="one entry per config"):
        allocate(costs, np.array([2.5]), numels, 3.0)


def test_exact_reductions_keep_the_optimum_on_a_larger_instance():
    """30 matrices x 48 configs: the reduced (reduced-cost fixing + Pareto) problem and the full one
    reach the same optimum."""
    rng = np.random.default_rng(1)
    bits = np.sort(rng.uniform(2.0, 8.6, size=48))
    costs = rng.uniform(1, 100, size=(30, 1)) * np.exp(-bits[None, :] * rng.uniform(0.4, 1.0, size=(30, 1)))
    costs *= rng.uniform(0.8, 1.2, size=costs.shape)
    numels = rng.integers(1, 20, size=30) * 4096
    for budget in (2.6, 3.1, 3.9):
        fast = allocate(costs, bits, numels, budget)
        full = allocate(costs, bits, numels, budget, prune=False)
        total = [sum(costs[i, c] for i, c in enumerate(x)) for x in (fast, full)]
        assert total[0] == pytest.approx(total[1], rel=1e-7)
        assert allocation_bits(fast, bits, numels) <= budget * (1 + 1e-12)
