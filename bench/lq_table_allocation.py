"""Does a cheaper LQ error table change LQ-LoRA's bit allocation? The ILP's choice from the fast ("shared") and
warm-started ("warm") tables against the exact table ("refine") on 4 small synthetic matrices (64 x 128, Gaussian
and Student-t(3), rank 8, all 432 candidates), at 20 budgets from 2.25 to 4.625 bits per parameter.

    python bench/lq_table_allocation.py

Per budget: whether the allocation equals the exact table's, and its regret: the exact table's cost of the
allocation chosen over the exact table's optimum (1.000: as good as the exact table's own choice).
"""
from __future__ import annotations

import time

import torch

from qbara.lq.tables import error_table


def matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(4):
        if i % 2:
            chi2 = torch.randn(3, 64, 128, generator=g).square().sum(0)
            out[f"student-t3-{i}"] = torch.randn(64, 128, generator=g) / torch.sqrt(chi2 / 3.0) * 0.02
        else:
            out[f"gaussian-{i}"] = torch.randn(64, 128, generator=g) * 0.02
    return out


def main() -> None:
    torch.set_num_threads(1)
    weights = matrices()
    tables = {}
    for mode in ("shared", "warm", "refine"):
        start = time.perf_counter()
        tables[mode] = error_table(weights, rank=8, dq_mode=mode, cache=False, progress=False)
        print(f"{mode}: {time.perf_counter() - start:.1f} s", flush=True)
    exact = tables["refine"]
    budgets = [2.25 + 0.125 * k for k in range(20)]
    print("| table | same allocation as refine | regret max | regret mean |\n|---|---|---|---|")
    for mode in ("shared", "warm"):
        same, regrets = 0, []
        for b in budgets:
            mine, best = tables[mode].allocate(b), exact.allocate(b)
            same += mine.indices == best.indices
            regrets.append(float(sum(exact.costs[i, j] for i, j in enumerate(mine.indices))) / best.error)
        print(f"| {mode} | {same}/{len(budgets)} | {max(regrets):.3f} | {sum(regrets) / len(regrets):.4f} |")


if __name__ == "__main__":
    main()
