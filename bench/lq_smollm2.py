"""LQ-LoRA on SmolLM2-135M: error table (210 matrices x 432 configs), ILP allocation per budget,
and a comparison with plain QLoRA NF4 / NF3 quantization.

    python bench/lq_smollm2.py                       # table (cached) + allocations
    python bench/lq_smollm2.py --recompute --workers 2
    python bench/lq_smollm2.py --verify 12           # table vs full decompose on sampled pairs
    python bench/lq_smollm2.py --ppl                 # + perplexity of Q + L1 L2 models (slow)

Errors are Σ_i ||W_i - Q_i - L1_i L2_i||_F² over the 210 linear weights (rank-r factors not counted
in the bits, as in the LQ-LoRA paper); the plain rows are Σ ||W_i - Q_i||_F².
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from qbara.lq.configs import candidate_configs, qlora_config
from qbara.lq.decompose import decompose
from qbara.lq.tables import DEFAULT_TABLE_ITERS, error_table
from qbara.models import load_model
from qbara.quant import quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=DEFAULT_TABLE_ITERS, help="decomposition iterations in the table")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.25, 3.5, 4.0])
    ap.add_argument("--workers", type=int, default=None, help="matrices in parallel (threads)")
    ap.add_argument("--recompute", action="store_true", help="recompute the table even if cached (and re-cache it)")
    ap.add_argument("--verify", type=int, default=0, help="compare N sampled table entries with decompose()")
    ap.add_argument("--ppl", action="store_true", help="perplexity on Hamlet of the allocated Q + L1 L2 models")
    ap.add_argument("--ppl-iters", type=int, default=10, help="decompose() iterations for the --ppl models")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"model load: {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    table = error_table(model, candidate_configs(), rank=args.rank, iters=args.iters, recompute=args.recompute,
                        workers=args.workers)
    t_table = time.perf_counter() - t0
    src = "cache hit" if table.from_cache else f"computed ({table.seconds:.1f} s of compute)"
    print(f"error table {len(table.names)} x {len(table.configs)}: {t_table:.1f} s wall, {src}")
    low, high = table.budget_range()
    print(f"feasible budgets {low:.3f} .. {high:.3f} bits/param (above: no further gain)")

    # Plain quantization baselines (rank 0, no low-rank part).
    t0 = time.perf_counter()
    weights = {n: model.get_submodule(n).weight.detach() for n in table.names}
    plain = {}
    for bits in (4, 3):
        cfg = qlora_config(bits)
        plain[bits] = sum(float(((w - quantize(w, cfg, n).dequantize()) ** 2).sum()) for n, w in weights.items())
    print(f"plain baselines: {time.perf_counter() - t0:.1f} s")

    rows = []
    allocs = {}
    t_alloc = 0.0
    for budget in args.budgets:
        t0 = time.perf_counter()
        alloc = table.allocate(budget)
        dt = time.perf_counter() - t0
        t_alloc += dt
        allocs[budget] = alloc
        mean_b = sum(c.bits * n for c, n in zip(alloc.configs.values(), table.numels.tolist())) / table.numels.sum()
        rows.append((f"LQ-LoRA r{args.rank} ILP @ {budget}", alloc.bits_per_param, alloc.error,
                     f"mean b {float(mean_b):.2f}, ILP {dt * 1000:.0f} ms"))
    for bits in (4, 3):
        cfg = qlora_config(bits)
        rows.append((f"LQ r{args.rank} uniform {cfg.label}", cfg.bits_per_param, table.uniform_error(cfg), ""))
        rows.append((f"QLoRA plain {cfg.label}", cfg.bits_per_param, plain[bits], "rank 0"))
    rows.sort(key=lambda r: (r[1], r[0]))

    print()
    print(f"{'method':44s} {'bits/param':>10s} {'Σ ||W-Q-L1L2||²':>16s}  notes")
    for name, bits, err, note in rows:
        print(f"{name:44s} {bits:10.3f} {err:16.2f}  {note}")
    print(f"\ntable + {len(args.budgets)} allocations: {t_table + t_alloc:.1f} s wall")
    for budget, alloc in allocs.items():
        top = ", ".join(f"{k} x{v}" for k, v in list(alloc.counts().items())[:4])
        print(f"  {budget}: {top}{' ...' if len(alloc.counts()) > 4 else ''}")

    if args.verify:
        print(f"\nverify: table vs decompose() on {args.verify} sampled (matrix, config) pairs")
        rng = random.Random(0)
        print(f"{'matrix':38s} {'config':26s} {'table':>9s} {'dec@iters':>9s} {'dec@100':>9s} ratio(table/dec@iters)")
        for _ in range(args.verify):
            i = rng.randrange(len(table.names))
            j = rng.randrange(len(table.configs))
            w, cfg = weights[table.names[i]], table.configs[j]
            d_short = decompose(w, cfg, rank=args.rank, max_iters=args.iters)
            d_full = decompose(w, cfg, rank=args.rank, max_iters=100)
            t = float(table.costs[i, j]) ** 0.5
            print(f"{table.names[i][6:]:38s} {cfg.label:26s} {t:9.4f} {d_short.error:9.4f} {d_full.error:9.4f} "
                  f"{t / d_short.error:.3f}")

    if args.ppl:
        from qbara.data import shakespeare_text
        from qbara.eval import perplexity

        ids = torch.tensor(tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"])

        def ppl(m):
            return perplexity(m, ids, window=args.window, max_tokens=args.ppl_tokens, progress=False).ppl

        def build(assign, rank):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for n, cfg in assign.items():
                    lin = m.get_submodule(n)
                    if rank == 0:
                        lin.weight.copy_(quantize(lin.weight, cfg, n).dequantize())
                    else:
                        d = decompose(lin.weight, cfg, rank=rank, max_iters=args.ppl_iters, name=n)
                        lin.weight.copy_(d.reconstruct())
            return m

        print(f"\nperplexity, Hamlet, window {args.window}, {args.ppl_tokens} tokens max "
              f"(LQ models: decompose with {args.ppl_iters} iterations)")
        print(f"  fp32: {ppl(model):.3f}")
        for bits in (4, 3):
            cfg = qlora_config(bits)
            t0 = time.perf_counter()
            print(f"  QLoRA plain {cfg.label}: {ppl(build({n: cfg for n in table.names}, 0)):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)")
        for budget, alloc in allocs.items():
            t0 = time.perf_counter()
            print(f"  LQ r{args.rank} @ {budget} ({alloc.bits_per_param:.3f} bits): "
                  f"{ppl(build(alloc.configs, args.rank)):.3f} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
