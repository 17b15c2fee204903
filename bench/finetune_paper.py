"""Paper-faithful fine-tuning comparison on SmolLM2-135M: Q-BaRA vs QLoRA (NF4 + double quant) and QA-HiRA vs
QA-LoRA (INT4, groups of 32), with the authors' hyper-parameters, a per-method learning-rate sweep on a
validation split, several seeds and 2-SD verdicts.

    python bench/finetune_quality.py --paper --out bench/results          # or: python bench/finetune_paper.py
    # as run for bench/results/finetune_quality_paper.*: one single-thread worker per method, then join
    for m in qlora qbara qalora qahira; do
        OMP_NUM_THREADS=1 nice -n 15 python bench/finetune_paper.py --out DIR --methods $m --part $m &
    done; wait
    python bench/finetune_paper.py --combine DIR                          # join the parts: json, md, png
    # extending a stored result instead of recomputing it (same setting; only lrs and methods may differ), as the
    # current bench/results/finetune_quality_paper.* was made (two workers, methods one after another on each):
    R="--resume STORED.json --out DIR --threads 1 --grow-to 1.6e-2 --lr-seed 0"  # that result picked on seed 0
    OMP_NUM_THREADS=1 nice -n 15 python bench/finetune_paper.py $R --methods qahira --part qahira --lrs 1.6e-2  # then
    ...                                                    $R --methods qalora --part qalora --lrs 4e-3 --verify-lr 2e-3
    ...                                                    $R --methods qahira-tile --part qahira-tile --lrs 8e-3 4e-3 \
                                                              2e-3 1e-3 5e-4 2e-4                          # then
    ...                                                    $R --methods qbara --part qbara --lrs 4e-3
    python bench/finetune_paper.py $R --methods qlora --part qlora --lrs 1e-3  # nothing to run: copies its runs
    python bench/finetune_paper.py --combine DIR --notes NOTES.json --wall-s S --wall-note TEXT

Resuming (--resume FILE, a part or a combined result): a run is seed -> prepare -> train, so the stored lr-seed run
at an lr is the sweep point at that lr and is reused as it is (a stored `lr_edge_check`'s lr-seed runs too). Only the
missing (method, lr) points of --lrs run (then, with --grow-to, the lr doubles while the method's top lr is its
best, i.e. its validation loss is still falling, up to that cap); the best lr is re-chosen over all points; the
seeds run at it only where missing. If the best lr moved to a new point, that run's model is finished (held-out +
merged) in memory; if it moved to a stored point that lacks them, the point is re-run (finishing needs the trained
model) and the re-run is recorded as a determinism check (validation, and held-out when stored, against the stored
values); --verify-lr LR re-runs one stored point just for that check. A stored result of another setting (model,
rank, alpha, dropout, steps, batch, seq, seeds, warm-up, clip, threads, split sizes) is refused. Without --resume
nothing changes. --combine refuses parts of different settings and states each method's own lr grid.

Protocol (the authors' reference code, SPEC §2): rank 64, alpha 16 (scaling s = 0.25) for every method, dropout
0, AdamW (no weight decay), lr constant after a linear warm-up over 3 % of the steps, gradient norm clipped at
0.3. QA-LoRA keeps rank 64 (on SmolLM2 its A has d_in/32 = 18 or 48 columns, so its rank is capped there);
QA-HiRA's output repetition is chosen per layer to come closest to LoRA r64's count, which on 576-wide layers
is the full group-constant matrix (d_out x d_in/32) and still has fewer parameters — every row states its count
and each comparison says by how much the counts differ. Per method: every lr of the grid is trained with the
validation seed --lr-seed (default 1000, not one of the reported --seeds) and scored on the validation split
(disjoint from the held-out split); the best lr is then trained with every reported seed (seed -> prepare -> train:
the seed draws the adapter initialisation and the data order), so the reported mean holds no run that chose the
lr. (The stored SmolLM2 result predates --lr-seed: it picked the lr on seed 0, also reported; resume it with
--lr-seed 0, and its report says so.) `qahira-authors` is QA-HiRA with `AdapterConfig(preset="authors")` (pool_out
8 on every layer, the authors' setting); `qahira-tile` keeps the per-layer default pool_out on the same 4x8 base.
Reported: held-out loss (mean ± SD over seeds) of the adapter model and
of the deployable merged model (QA-LoRA / QA-HiRA folded into their INT4 minima; QLoRA / Q-BaRA dequantized,
added and re-quantized to NF4), next to the dense model's and each base's step-0 loss. A claim counts as
reproduced / not reproduced only when the gap of the means exceeds 2 SD of the difference,
sqrt(SD_a² + SD_b²); otherwise it is inconclusive.

Design note — the budget compromise (measured, not assumed). The authors train 10,000 steps of batch 16 on
Alpaca (~30 M tokens). This benchmark had to finish in about 75 minutes on 2 CPU cores shared with four other
jobs, niced (nice 15). What was measured there, rank 64:
- threads: one step of batch 4 x 32 tokens took 2.7-3.7 s on one torch thread but 7.5-116 s on two, because
  two OpenMP threads on oversubscribed cores spin at their barriers; every worker runs on one thread.
- the frozen base is dequantized once per run (`dequantized_once`) instead of on every forward and backward
  (batch 4 x 64 with on-the-fly dequantization: 15-83 s/step). This changes no number: a plain linear layer
  holding the dequantized fp32 weight computes what the quantized layer computes by dequantizing each call.
- CPU share: niced, the run got about 0.65 of a core in all, whether as two workers (~30 % each) or four
  (~17 % each). A step of batch 2 x 32 costs ~1.65 CPU-s (forward ~0.75, backward ~0.6, AdamW on 19.5 M
  adapter parameters ~0.3), i.e. ~10 s of wall time per step and worker.
So the methods run as four single-thread workers in parallel (one method each, `--part`), each doing 4 sweep runs +
2 more seeds = 6 runs, and what fits ~75 minutes is 60 steps per run at batch 2 x 32 tokens (3,840 tokens per run:
~1/8,000 of the authors' tokens). Issue #11 asks for several hundred steps; that did not fit this CPU share (100
steps at batch 2 would take ~17 min per run at the measured share, ~100 min per worker), and 60 steps is what the
run used. It is 6x the smoke test's 10 steps (run_all --quick) at s·lr 2-20x smaller (s = 0.25 instead of 2, with
warm-up and clipping), but still an early-training horizon: an lr picked at 60 steps favours larger lrs than a
10k-step run would, and the verdicts are about this horizon, not about converged fine-tunes. lr grid 2e-4 (the
authors'), 5e-4, 1e-3, 2e-3; 3 seeds; Shakespeare (Hamlet) in 32-token chunks, 32 validation and 48 held-out chunks
taken from the end of the play (disjoint from training and from each other). With a larger share (or a GPU), raise
--steps and --batch: nothing else changes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import finetune_quality as fq

PAPER_METHODS = ("qlora", "qbara", "qalora", "qahira", "qahira-tile", "qahira-authors")
CLAIMS = (("qbara", "qlora", "Q-BaRA beats QLoRA (NF4, equal trainable parameters)"),
          ("qahira", "qalora", "QA-HiRA beats QA-LoRA (INT4 G32)"),
          ("qahira-tile", "qalora", "QA-HiRA (authors' 4x8 tile) beats QA-LoRA (INT4 G32)"),
          ("qahira-authors", "qalora", "QA-HiRA (authors' preset: 4x8 tile, pool_out 8 on every layer) beats "
                                       "QA-LoRA (INT4 G32)"))
LR_SEED = 1000  # the default validation seed that picks the lr: not one of the reported seeds


def lr_seed_of(setting) -> int:
    """The seed whose validation loss picked the lr (a dict or options); results made before --lr-seed existed
    picked it on their first reported seed."""
    get = setting.get if isinstance(setting, dict) else lambda k, d=None: getattr(setting, k, d)
    seed = get("lr_seed")
    return get("seeds")[0] if seed is None else seed


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["qlora", "qbara", "qalora", "qahira", "qahira-authors"],
                    choices=PAPER_METHODS)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3])
    ap.add_argument("--steps", type=int, default=60, help="steps of every run (sweep and seeds)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="tokens per Shakespeare chunk")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the reported seeds")
    ap.add_argument("--lr-seed", type=int, default=LR_SEED,
                    help="the validation seed whose sweep picks each method's lr; keep it outside --seeds (one of "
                         "them only to extend a result made that way: the lr is then fitted to a reported seed)")
    ap.add_argument("--warmup", type=float, default=0.03, help="linear warm-up share of the steps")
    ap.add_argument("--clip", type=float, default=0.3, help="gradient-norm clip")
    ap.add_argument("--val", type=int, default=32, help="validation chunks (lr choice)")
    ap.add_argument("--held-out", type=int, default=48, help="held-out chunks (reported)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the design note)")
    ap.add_argument("--no-merge", action="store_true", help="skip the merged-model evaluation")
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="only time N training steps per method (at the first lr) and print them")
    ap.add_argument("--part", help="name of this worker's part (results go to finetune_quality_paper.PART.json)")
    ap.add_argument("--combine", metavar="DIR", help="join DIR's finetune_quality_paper.*.json parts and report")
    ap.add_argument("--resume", metavar="FILE",
                    help="extend a stored result (a part or a combined JSON of the same setting: only lrs and "
                         "methods may differ): reuse its runs, run only the missing sweep points, re-choose the "
                         "best lr over all of them and run the seeds it still lacks there")
    ap.add_argument("--grow-to", type=float, metavar="LR",
                    help="after the grid, double the lr while the method's best lr is its top one (validation loss "
                         "still falling), up to LR")
    ap.add_argument("--verify-lr", type=float, metavar="LR",
                    help="with --resume: re-run each method's stored lr-seed point at LR and record whether the "
                         "re-run matches it (determinism)")
    ap.add_argument("--notes", metavar="FILE", help="with --combine: a JSON list of notes for the report")
    ap.add_argument("--wall-note", help="with --combine: how the parts were run (shown next to the wall time)")
    ap.add_argument("--wall-s", type=float, help="with --combine: the measured wall time of the session that made "
                                                 "the parts (default: the longest part's)")
    ap.add_argument("--out", help="results folder")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.qalora_rank_match = False  # QA-LoRA at rank 64, as the authors ran it
    return args


# --------------------------------------------------------------------------------------------------
# Data and evaluation


def bos_of(tokenizer) -> int | None:
    """The BOS id a tokenizer puts before every text by default (Gemma's; a model trained that way scores text
    without it as noise), else None (SmolLM2's)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def splits(tokenizer, seq: int, val: int, held: int):
    """Hamlet in `seq`-token chunks: train, then `val` validation chunks, then `held` held-out chunks (disjoint).
    Where the tokenizer adds a BOS by default, every chunk starts with it (never a target)."""
    from qbara.data import shakespeare_text
    from qbara.train.data import IGNORE_INDEX, Example

    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False).input_ids
    bos = bos_of(tokenizer)
    head, masked = ([bos], [IGNORE_INDEX]) if bos is not None else ([], [])
    chunks = [Example(head + ids[i:i + seq], masked + ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]
    cut = len(chunks) - val - held
    return chunks[:cut], chunks[cut:cut + val], chunks[cut + val:]


@contextmanager
def dequantized_once(model):
    """Swap every QuantizedLinear (adapter bases, merged layers) for a frozen nn.Linear holding its dequantized
    fp32 weight — the values the quantized layer computes on every call — and put them back on exit."""
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.targets import set_submodule

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            set_submodule(model, name, module.to_linear())
            swapped.append((name, module))
    try:
        yield model
    finally:
        for name, module in swapped:
            set_submodule(model, name, module)


def loss_on(model, examples, args) -> float:
    from qbara.eval.loss import masked_loss

    model.eval()
    with torch.no_grad(), dequantized_once(model):
        return masked_loss(model, examples, args.eval_batch)["loss"]


# --------------------------------------------------------------------------------------------------
# Resuming: extend a stored result instead of recomputing it

# Everything that decides what a run computes, except the lr grid and the methods (the data split sizes and the
# torch thread count too: a run on another thread count sums in another order and is not bit-identical).
SAME_SETTING = ("model", "rank", "alpha", "dropout", "steps", "batch", "seq", "seeds", "warmup", "clip", "threads",
                "lr_seed")


def same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def setting_mismatch(stored: dict, args) -> list[str]:
    """What differs between a stored result's setting (and data split) and this run's options, besides lrs and
    methods; empty when its runs are this run's runs."""
    st = stored["setting"]
    def value(setting, k):
        return lr_seed_of(setting) if k == "lr_seed" else (setting.get(k) if isinstance(setting, dict)
                                                           else getattr(setting, k))
    diff = [f"{k}: stored {value(st, k)!r}, now {value(args, k)!r}" for k in SAME_SETTING
            if value(st, k) != value(args, k)]
    d = stored.get("data", {})
    for key, opt in (("val", "val"), ("held_out", "held_out")):
        if key in d and d[key] != getattr(args, opt):
            diff.append(f"{key} chunks: stored {d[key]}, now {getattr(args, opt)}")
    return diff


def check_setting(stored: dict, args, source="--resume") -> None:
    diff = setting_mismatch(stored, args)
    if diff:
        raise SystemExit(f"{source}: the stored result was made with another setting, so its runs are not this "
                         f"run's runs; refusing to mix them ({'; '.join(diff)}). Run with the stored setting, or "
                         f"start a new result without {source}.")


def stored_runs(stored: dict, seed0: int, steps: int) -> list[dict]:
    """The stored runs, plus the lr-seed runs of a stored `lr_edge_check` (made by this script with the same
    setting, only other lrs: the same runs as sweep points at those lrs)."""
    runs = [dict(r) for r in stored.get("runs", [])]
    for r in stored.get("lr_edge_check", {}).get("runs", []):
        if r.get("seed") == seed0 and r.get("steps") == steps and not sweep_run(runs, r["method"], r["lr"], seed0):
            runs.append(dict(r, phase="sweep", reused_from="lr_edge_check"))
    return runs


def sweep_run(runs: list[dict], method: str, lr: float, seed0: int) -> dict | None:
    """The lr-seed (`seed0`) run of `method` at `lr` (the sweep point; the one with held-out losses if two)."""
    found = [r for r in runs if r["method"] == method and r["seed"] == seed0 and same_lr(r["lr"], lr) and "val" in r]
    found.sort(key=lambda r: ("merged" in r, "held" in r))
    return found[-1] if found else None


def swept_lrs(runs: list[dict], method: str, seed0: int) -> list[float]:
    return sorted({r["lr"] for r in runs if r["method"] == method and r["seed"] == seed0 and "val" in r})


def missing_lrs(runs: list[dict], method: str, lrs, seed0: int) -> list[float]:
    """The lrs of `lrs` (in their order) that `method` has no lr-seed sweep run at."""
    out = []
    for lr in lrs:
        if sweep_run(runs, method, lr, seed0) is None and not any(same_lr(lr, x) for x in out):
            out.append(lr)
    return out


def best_sweep_lr(runs: list[dict], method: str, seed0: int, order=None) -> float | None:
    """The lr of the lowest lr-seed validation loss (ties: the first in `order`, else the smallest lr)."""
    lrs = swept_lrs(runs, method, seed0)
    if order:
        lrs = sorted(lrs, key=lambda x: next((i for i, y in enumerate(order) if same_lr(x, y)), len(order)))
    return min(lrs, key=lambda lr: sweep_run(runs, method, lr, seed0)["val"]) if lrs else None


def next_growth(runs: list[dict], method: str, seed0: int, grow_to: float | None) -> float | None:
    """--grow-to: while the best lr is the top of the method's grid (its validation loss still falling there),
    the next lr up (2x), as long as it stays within `grow_to`."""
    lrs = swept_lrs(runs, method, seed0)
    if not grow_to or not lrs or not same_lr(best_sweep_lr(runs, method, seed0), lrs[-1]):
        return None
    nxt = 2 * lrs[-1]
    return nxt if nxt <= grow_to * (1 + 1e-9) else None


def final_todo(runs: list[dict], method: str, lr: float, seeds, merge: bool,
               lr_seed: int | None = None) -> list[tuple[int, str]]:
    """The final runs still to do at the chosen lr, one per reported seed: (seed, 'finish') when the seed is the lr
    seed (default: the first) and its sweep run lacks its held-out (or merged) loss, (seed, 'run') for a missing
    seed. With the lr seed outside `seeds` (the default) every reported seed is a run of its own."""
    lr_seed = seeds[0] if lr_seed is None else lr_seed
    todo = []
    def done(r):
        return "held" in r and ("merged" in r or not merge)
    for seed in seeds:
        if seed == lr_seed:
            r0 = sweep_run(runs, method, lr, seed)
            if r0 is None or not done(r0):
                todo.append((seed, "finish"))
        elif not any(r["method"] == method and r["seed"] == seed and same_lr(r["lr"], lr) and done(r)
                     for r in runs):
            todo.append((seed, "run"))
    return todo


def relabel(result: dict) -> None:
    """Final runs at an lr that is no longer the method's chosen one (the best lr moved in a resumed run) are
    marked as such; they keep their losses."""
    for r in result["runs"]:
        best = result["methods"].get(r["method"], {}).get("best_lr")
        if best is not None and r.get("phase") in ("final", "sweep+final") and not same_lr(r["lr"], best):
            r["phase"] = "sweep" if r["phase"] == "sweep+final" else "final at an earlier best lr"


def plan(stored: dict, args) -> dict:
    """Dry plan of a resumed run on the stored runs alone (the sweep points it adds; what the chosen lr still
    needs if the sweep does not move it); refuses a stored result of another setting."""
    check_setting(stored, args)
    seed0 = args.lr_seed
    runs = stored_runs(stored, seed0, args.steps)
    out = {}
    for method in args.methods:
        best = best_sweep_lr(runs, method, seed0)
        out[method] = {"sweep": missing_lrs(runs, method, args.lrs, seed0), "best_lr_stored": best,
                       "final": final_todo(runs, method, best, args.seeds, not args.no_merge, seed0) if best
                       else None}
    return out


def load_resume(path, args) -> dict:
    stored = json.loads(Path(path).read_text())
    check_setting(stored, args, f"--resume {path}")
    return stored


# --------------------------------------------------------------------------------------------------
# Runs


def one_run(prepared, method, data, args, lr: float, seed: int, full: bool) -> dict:
    """seed -> prepare -> train at `lr`; validation loss, and with `full` the held-out loss of the adapter model
    and of its merged form."""
    train, val, held = data
    start = time.perf_counter()
    model = fresh_model(prepared, seed)
    with dequantized_once(model):
        curve, step_s = fq.train_steps(model, train, args.steps, args.batch, lr, seed, torch.device(args.device),
                                       warmup=args.warmup, clip=args.clip)
    out = {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "step_s": step_s,
           "curve": curve[::max(1, len(curve) // 50)], "train_end": statistics.fmean(curve[-10:]),
           "val": loss_on(model, val, args)}
    if full:
        finish(model, method, out, held, args)
    out["seconds"] = time.perf_counter() - start
    return out, model


def fresh_model(prepared, seed: int):
    """fq.fresh_model, except that a method with a deterministic initialisation (LQ-LoRA: no adapter config) shares
    its frozen tensors with the prepared model instead of copying them (no run writes them; a 262k-vocabulary
    embedding is 0.67 GB per copy)."""
    if prepared.adapter is not None:
        return fq.fresh_model(prepared, seed)
    model = prepared.model
    frozen = [t for t in model.parameters() if not t.requires_grad] + list(model.buffers())
    return copy.deepcopy(model, memo={id(t): t for t in frozen})


def finish(model, method, out: dict, held, args) -> None:
    """Held-out loss of the adapter model and (unless --no-merge) of its deployable merged form."""
    from qbara import merge

    out["held"] = loss_on(model, held, args)
    if args.no_merge:
        return
    if method in fq.FOLDABLE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merge(model, into="quantized")
        out["merge"], out["fold_rounding"] = "fold", model.qbara.fold_rounding
    else:
        merge(model, into="requantized")
        out["merge"] = "re-quantized"
    out["merged"] = loss_on(model, held, args)


def determinism(stored: dict, new: dict) -> dict:
    rec = {"method": new["method"], "lr": new["lr"], "seed": new["seed"], "stored_val": stored["val"],
           "rerun_val": new["val"], "val_diff": abs(new["val"] - stored["val"])}
    if "held" in stored and "held" in new:
        rec.update(stored_held=stored["held"], rerun_held=new["held"], held_diff=abs(new["held"] - stored["held"]))
    rec["identical"] = rec["val_diff"] <= 1e-6 and rec.get("held_diff", 0.0) <= 1e-6
    print(f"determinism {new['method']} lr {new['lr']:g} seed {new['seed']}: stored val {stored['val']:.8f}, "
          f"re-run {new['val']:.8f} (|diff| {rec['val_diff']:.2e}"
          + (f"; held-out |diff| {rec['held_diff']:.2e}" if "held_diff" in rec else "") + ")", flush=True)
    return rec


def run(args, dense=None, tokenizer=None, prepare_method=None) -> dict:
    """The sweep and the seeds of args.methods (see the module docstring). prepare_method: builds a method's
    `fq.Prepared` (default fq.prepare_method; a bench with other methods passes its own); a Prepared without
    `quantized` (LQ-LoRA) reports its step-0 model as its base."""
    from qbara.adapters import trainable_parameter_count
    from qbara.atomic import write_json_atomic
    from qbara.models import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lazy = {"dense": dense, "tokenizer": tokenizer, "data": None}

    def model_and_data():
        """The dense model, its tokenizer and the splits, loaded on first use (a resumed run that only reuses
        stored runs loads nothing)."""
        if lazy["data"] is None:
            if lazy["dense"] is None:
                lazy["dense"], lazy["tokenizer"] = load_model(args.model)
            lazy["data"] = splits(lazy["tokenizer"], args.seq, args.val, args.held_out)
        return lazy["dense"], lazy["tokenizer"], lazy["data"]

    path = Path(args.out) / f"finetune_quality_paper{'.' + args.part if args.part else ''}.json" if args.out else None
    setting = {k: getattr(args, k) for k in ("model", "rank", "alpha", "dropout", "lrs", "steps", "batch", "seq",
                                              "seeds", "lr_seed", "warmup", "clip", "threads")}
    seed0 = args.lr_seed
    if args.resume:
        stored = load_resume(args.resume, args)
        keep = set(args.methods) if args.part else set(stored["methods"]) | set(args.methods)
        result = {k: stored[k] for k in ("data", "optimizer", "dense") if k in stored}
        result.update(setting=setting, bases=dict(stored.get("bases", {})),
                      methods={m: dict(e) for m, e in stored["methods"].items() if m in keep},
                      runs=[r for r in stored_runs(stored, seed0, args.steps) if r["method"] in keep],
                      resumed_from=str(args.resume),
                      earlier_wall_s=stored.get("earlier_wall_s", 0.0) + stored.get("wall_s", 0.0))
        print(f"resuming {args.resume}: {len(result['runs'])} stored runs of {sorted(keep)}", flush=True)
    else:
        dense, tokenizer, data = model_and_data()
        result = {"setting": setting,
                  "data": {"task": "shakespeare (hamlet)", "train": len(data[0]), "val": len(data[1]),
                           "held_out": len(data[2]), "bos": bos_of(tokenizer) is not None},
                  "optimizer": "AdamW (betas 0.9/0.999, no weight decay), lr constant after linear warm-up",
                  "dense": {"val": loss_on(dense, data[1], args), "held": loss_on(dense, data[2], args)},
                  "bases": {}, "methods": {}, "runs": []}
        print(f"dense: val {result['dense']['val']:.4f} held-out {result['dense']['held']:.4f}", flush=True)
    runs = result["runs"]
    loaded = {id(r) for r in runs}  # the stored runs (--verify-lr re-runs one of these)

    def save():
        result["setting"]["lrs"] = sorted({r["lr"] for r in runs if r["seed"] == seed0} | set(args.lrs))
        result["wall_s"] = time.perf_counter() - t0
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, result)

    for method in args.methods:
        lazy_prep = {}

        def prepared(method=method, lazy_prep=lazy_prep):
            """The method's quantized base and adapter config, prepared on first use (with its entry and base loss)."""
            if "p" not in lazy_prep:
                dense, tokenizer, data = model_and_data()
                p = lazy_prep["p"] = (prepare_method or fq.prepare_method)(method, dense, tokenizer, args,
                                                                           seed=seed0)
                if p.base not in result["bases"]:
                    step0 = p.quantized if p.quantized is not None else p.model
                    result["bases"][p.base] = {"val": loss_on(step0, data[1], args),
                                               "held": loss_on(step0, data[2], args)}
                    print(f"base {p.base}: held-out {result['bases'][p.base]['held']:.4f}", flush=True)
                entry = result["methods"].setdefault(method, {})
                entry.update(label=p.label, base=p.base, trainable=trainable_parameter_count(p.model),
                             adapter=repr(p.adapter))
            return lazy_prep["p"]

        if args.measure:
            p = prepared()
            model = fq.fresh_model(p, 0)
            with dequantized_once(model):
                saved = args.steps
                args.steps = args.measure
                curve, step_s = fq.train_steps(model, model_and_data()[2][0], args.measure, args.batch, args.lrs[0],
                                               0, "cpu", warmup=args.warmup, clip=args.clip)
                args.steps = saved
            result["methods"][method]["measured_step_s"] = step_s
            print(f"{p.label}: {step_s:.2f} s/step (batch {args.batch} x {args.seq})", flush=True)
            continue
        if method not in result["methods"]:
            prepared()
        entry = result["methods"][method]
        label = entry["label"]
        old_best = entry.get("best_lr")
        # the sweep: the missing lrs of the grid, then (--grow-to) upward while the top lr is still the best
        candidate = None  # (lr, model) of the best new sweep run so far, kept to finish it without a re-run
        todo = missing_lrs(runs, method, args.lrs, seed0)
        while todo:
            lr = todo.pop(0)
            best_before = best_sweep_lr(runs, method, seed0, args.lrs)
            r, model = one_run(prepared(), method, model_and_data()[2], args, lr, seed0, full=False)
            r["phase"] = "sweep"
            runs.append(r)
            print(f"{label:22s} lr {lr:.0e} seed {seed0}: val {r['val']:.4f} "
                  f"({r['step_s']:.2f} s/step, {r['seconds']:.0f} s)", flush=True)
            if best_before is None or r["val"] < sweep_run(runs, method, best_before, seed0)["val"]:
                candidate = (lr, model)
            del model
            save()
            if not todo and (grow := next_growth(runs, method, seed0, args.grow_to)):
                todo.append(grow)
        lr = best_sweep_lr(runs, method, seed0, args.lrs)
        entry["best_lr"] = lr
        entry["lrs"] = swept_lrs(runs, method, seed0)
        if old_best is not None and not same_lr(old_best, lr):
            entry["best_lr_before"] = old_best
            relabel(result)  # the runs at the old best keep their held-out losses; the final runs are now at `lr`
        # --verify-lr: re-run one stored sweep point and compare (the runs reused are the same deterministic runs)
        if args.verify_lr is not None and (stored_r := sweep_run(runs, method, args.verify_lr, seed0)) is not None \
                and id(stored_r) in loaded and not any(d["method"] == method for d in result.get("determinism", [])):
            rr, model = one_run(prepared(), method, model_and_data()[2], args, stored_r["lr"], seed0, full=False)
            if "held" in stored_r:
                rr["held"] = loss_on(model, model_and_data()[2][2], args)
            del model
            result.setdefault("determinism", []).append(determinism(stored_r, rr))
            save()
        for seed, what in final_todo(runs, method, lr, args.seeds, not args.no_merge, seed0):
            if what == "finish":
                r0 = sweep_run(runs, method, lr, seed)
                if candidate is not None and same_lr(candidate[0], lr):
                    finish(candidate[1], method, r0, model_and_data()[2][2], args)  # the sweep's own model
                else:  # a stored sweep point: finishing needs its trained model, i.e. the same run again
                    rr, _ = one_run(prepared(), method, model_and_data()[2], args, lr, seed, full=True)
                    result.setdefault("determinism", []).append(determinism(r0, rr))
                    rr["rerun_of_stored"] = True
                    runs[runs.index(r0)] = rr
                    r0 = rr
                r0["phase"] = "sweep+final"
            else:
                r, _ = one_run(prepared(), method, model_and_data()[2], args, lr, seed, full=True)
                r["phase"] = "final"
                runs.append(r)
            save()
        candidate = None
        s = summary(result, method)
        print(f"{label:22s} best lr {lr:.0e}: held-out {s['held']:.4f} ± {s.get('held_sd', float('nan')):.4f} "
              f"merged {s.get('merged', float('nan')):.4f}", flush=True)
        lazy_prep.clear()
    save()
    return result


# --------------------------------------------------------------------------------------------------
# Report


def final_runs(result: dict, method: str) -> list[dict]:
    """The reported runs of `method`: its reported seeds at its chosen lr (never the lr seed's sweep run unless
    that seed is a reported one)."""
    lr = result["methods"][method].get("best_lr")
    seeds = result.get("setting", {}).get("seeds")
    return [r for r in result["runs"] if r["method"] == method and lr is not None and same_lr(r["lr"], lr)
            and "held" in r and (seeds is None or r["seed"] in seeds)]


def summary(result: dict, method: str) -> dict:
    runs = final_runs(result, method)
    out = {"n": len(runs)}

    def stat(key):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = statistics.fmean(vals)
            out[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    for key in ("held", "merged", "val", "step_s"):
        stat(key)
    return out


def verdict(result: dict, a: str, b: str, claim: str) -> dict | None:
    """`a` claimed better (lower held-out loss) than `b`: counted only when the gap exceeds 2 SD of the difference."""
    m = result["methods"]
    if a not in m or b not in m or "best_lr" not in m[a] or "best_lr" not in m[b]:
        return None
    sa, sb = summary(result, a), summary(result, b)
    gap = sb["held"] - sa["held"]
    sd = math.sqrt(sa["held_sd"] ** 2 + sb["held_sd"] ** 2) if sa["n"] > 1 and sb["n"] > 1 else float("nan")
    # paired by seed (same data order for both methods at a seed)
    ra = {r["seed"]: r["held"] for r in final_runs(result, a)}
    rb = {r["seed"]: r["held"] for r in final_runs(result, b)}
    diffs = [rb[s] - ra[s] for s in ra if s in rb]
    paired_sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    if not sd == sd:
        word = "inconclusive (one seed: no spread)"
    elif abs(gap) > 2 * sd:
        word = "reproduced" if gap > 0 else "not reproduced"
    else:
        word = "inconclusive"
    ta, tb = m[a]["trainable"], m[b]["trainable"]
    return {"claim": claim, "a": a, "b": b, "gap": gap, "sd": sd, "paired_sd": paired_sd, "verdict": word,
            "a_held": sa["held"], "b_held": sb["held"], "trainable_diff": (ta - tb) / tb}


def verdicts(result: dict) -> list[dict]:
    return [v for v in (verdict(result, a, b, c) for a, b, c in CLAIMS) if v]


def method_grid(result: dict, method: str) -> list[float]:
    """The lrs `method` was swept at (its lr-seed runs), ascending."""
    return swept_lrs(result["runs"], method, lr_seed_of(result["setting"]))


def grid_text(lrs) -> str:
    return ", ".join(f"{x:g}" for x in lrs)


def markdown(result: dict) -> str:
    st, d = result["setting"], result["data"]
    seed0 = lr_seed_of(st)
    picked = (f"validation seed {seed0}, not a reported seed" if seed0 not in st["seeds"] else
              f"seed {seed0}, which is also reported: the lr is fitted to one of the reported runs")
    grids = {m: method_grid(result, m) for m in result["methods"]}
    shared = {tuple(g) for g in grids.values() if g}
    if len(shared) <= 1:
        grid = f"lr grid {grid_text(next(iter(shared), st['lrs']))}"
    else:
        grid = "lr grid per method: " + "; ".join(f"{result['methods'][m]['label']} {grid_text(g)}"
                                                  for m, g in grids.items() if g)
    wall = f"wall {result.get('wall_s', 0) / 60:.0f} min"
    if result.get("earlier_wall_s"):
        wall = (f"wall {result['wall_s'] / 60:.0f} min for this extension of a stored result "
                f"(+ {result['earlier_wall_s'] / 60:.0f} min before)")
    columns = sorted({lr for g in grids.values() for lr in g}) or st["lrs"]
    lines = [f"**Paper setting** ({st['model']}, {d['task']}, {d['train']} train / {d['val']} validation / "
             f"{d['held_out']} held-out chunks of {st['seq']} tokens{', each after a BOS' if d.get('bos') else ''}): "
             f"rank {st['rank']}, alpha {st['alpha']:g} "
             f"(s = {st['alpha'] / st['rank']:g}), dropout {st['dropout']:g}, AdamW, lr constant after "
             f"{st['warmup']:.0%} warm-up, grad-clip {st['clip']:g}, batch {st['batch']} x {st['seq']} tokens, "
             f"{st['steps']} steps, {grid} (chosen on the validation loss of {picked}), then seeds {st['seeds']} at "
             f"the chosen lr; {st['threads']} torch thread(s) per worker; {wall}"
             + (f" ({result['wall_note']})" if result.get("wall_note") else "") + ".",
             "", f"Dense (unquantized) step-0 held-out loss: **{result['dense']['held']:.4f}**; bases at step 0: "
             + ", ".join(f"{k} {v['held']:.4f} ({v['held'] - result['dense']['held']:+.4f} vs dense)"
                         for k, v in result["bases"].items()) + ".", "",
             (f"Validation loss per lr (seed {seed0}; the chosen lr in bold; – where a method was not run at that "
              "lr):"), "",
             "| method | " + " | ".join(f"lr {x:g}" for x in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method, e in result["methods"].items():
        cells = []
        for lr in columns:
            r = sweep_run(result["runs"], method, lr, seed0)
            c = f"{r['val']:.4f}" if r else "–"
            cells.append(f"**{c}**" if r and e.get("best_lr") is not None and same_lr(lr, e["best_lr"]) else c)
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out loss at each method's chosen lr (mean ± SD over seeds):", "",
              "| method | base | trainable | lr | dense start | base start | after training | Δ vs base start | "
              "Δ vs dense | merged (deployable) | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = result["dense"]["held"]
    for method, e in result["methods"].items():
        if "best_lr" not in e:
            continue
        s = summary(result, method)
        base = result["bases"][e["base"]]["held"]
        merged = (f"{s['merged']:.4f} ± {s['merged_sd']:.4f} ({final_runs(result, method)[0]['merge']})"
                  if "merged" in s else "–")
        lines.append(f"| {e['label']} | {e['base']} | {e['trainable']:,} | {e['best_lr']:g} | {dense:.4f} | "
                     f"{base:.4f} | {s['held']:.4f} ± {s['held_sd']:.4f} (n={s['n']}) | {s['held'] - base:+.4f} | "
                     f"{s['held'] - dense:+.4f} | {merged} | {s['step_s']:.2f} |")
    folds = {e["label"]: max(abs(r["merged"] - r["held"]) for r in final_runs(result, m))
             for m, e in result["methods"].items() if "best_lr" in e and final_runs(result, m)
             and all(r.get("merge") == "fold" and "merged" in r for r in final_runs(result, m))}
    if folds:
        lines += ["", "Folded into the INT4 minima, the merged model's held-out loss minus the adapter model's, "
                      "largest |difference| over the reported runs: "
                  + ", ".join(f"{label} {gap:.2e}" for label, gap in folds.items()) + "."]
    lines += ["", "Claims (counted only when the gap exceeds 2 SD of the difference, sqrt(SD_a² + SD_b²)):"]
    for v in verdicts(result):
        m = result["methods"]
        la, lb = m[v["a"]]["label"], m[v["b"]]["label"]
        lines.append(f"- {v['claim']}: **{v['verdict']}** — {la} {v['a_held']:.4f} vs {lb} {v['b_held']:.4f}, "
                     f"gap {v['gap']:+.4f} (positive favours {la}), 2 SD = {2 * v['sd']:.4f} (paired-by-seed SD "
                     f"{v['paired_sd']:.4f}); trainable parameters {m[v['a']]['trainable']:,} vs "
                     f"{m[v['b']]['trainable']:,} ({v['trainable_diff']:+.1%}).")
        if m[v["a"]].get("base") != m[v["b"]].get("base"):
            ba, bb = (result["bases"].get(m[k]["base"], {}).get("held") for k in (v["a"], v["b"]))
            lines[-1] += (f" Caveat: they start from different bases ({m[v['a']]['base']}"
                          + (f" {ba:.4f}" if ba is not None else "") + f" vs {m[v['b']]['base']}"
                          + (f" {bb:.4f}" if bb is not None else "") + " held-out at step 0).")
        edge = [m[k]["label"] for k in (v["a"], v["b"])
                if any(same_lr(m[k]["best_lr"], x) for x in (grids[k][0], grids[k][-1]))]
        if edge:
            lines[-1] += (f" Caveat: the chosen lr of {' and '.join(edge)} is at the edge of "
                          f"{'its' if len(edge) == 1 else 'their'} grid, so "
                          f"{'its' if len(edge) == 1 else 'their'} best lr may lie outside it.")
    if result.get("determinism"):
        lines += ["", "Determinism (a stored run re-run and compared; the reused runs are the same runs):"]
        for c in result["determinism"]:
            e = result["methods"].get(c["method"])
            label = e["label"] if e else c["method"]
            lines.append(f"- {label} lr {c['lr']:g} seed {c['seed']}: validation {c['stored_val']:.8f} stored, "
                         f"{c['rerun_val']:.8f} re-run (|diff| {c['val_diff']:.1e})"
                         + (f", held-out |diff| {c['held_diff']:.1e}" if "held_diff" in c else "")
                         + (" — identical to 1e-6" if c["identical"] else " — NOT identical to 1e-6") + ".")
    if result.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Left: validation loss vs lr per method (the lr seed). Right: held-out loss at the chosen lr (mean ± SD), with
    the dense and each base's step-0 losses as lines."""
    from qbara.plotting import pyplot, save_figure

    st = result["setting"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(13, 4.8))
    for method, e in result["methods"].items():
        pts = sorted((r["lr"], r["val"]) for r in result["runs"] if r["method"] == method and r["seed"] ==
                     lr_seed_of(st) and "val" in r)
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=e["label"])
    ax1.set_xscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel(f"validation loss after {st['steps']} steps (seed {lr_seed_of(st)})")
    ax1.set_title("lr sweep")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    done = [(m, e) for m, e in result["methods"].items() if "best_lr" in e]
    sums = [summary(result, m) for m, _ in done]
    x = range(len(done))
    ax2.bar(x, [s["held"] for s in sums], 0.6, yerr=[s["held_sd"] for s in sums], capsize=4, color="tab:blue",
            label="after training (mean ± SD)")
    ax2.axhline(result["dense"]["held"], color="black", ls="--", lw=1, label="dense, step 0")
    for (k, v), c in zip(result["bases"].items(), ("tab:red", "tab:green", "tab:purple")):
        ax2.axhline(v["held"], color=c, ls=":", lw=1, label=f"{k} base, step 0")
    ax2.set_xticks(list(x), [f"{e['label']}\nlr {e['best_lr']:g}" for _, e in done], fontsize=8)
    if sums:
        lo = min(min(s["held"] - s["held_sd"] for s in sums), result["dense"]["held"])
        hi = max(v["held"] for v in result["bases"].values())
        ax2.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax2.set_ylabel("held-out loss")
    ax2.set_title(f"paper setting: {st['steps']} steps, seeds {st['seeds']}")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def combine(folder, notes=None, wall_note=None, wall_s=None) -> dict:
    """Join the workers' part files into one result (methods and runs; dense/bases from every part). The parts
    must share the setting (lrs and methods aside); the lr grid becomes their union."""
    folder = Path(folder)
    parts = sorted(folder.glob("finetune_quality_paper.*.json"))
    if not parts:
        raise SystemExit(f"no finetune_quality_paper.*.json parts in {folder}")
    result = None
    walls, earlier = [], []
    for p in parts:
        r = json.loads(p.read_text())
        walls.append(r.get("wall_s", 0.0))
        earlier.append(r.get("earlier_wall_s", 0.0))
        if result is None:
            result = r
            result.pop("resumed_from", None)
            continue
        st = dict(r["setting"], val=r["data"]["val"], held_out=r["data"]["held_out"])
        check_setting(result, argparse.Namespace(**st), f"--combine {p.name}")
        for k in ("val", "held"):
            if abs(r["dense"][k] - result["dense"][k]) > 1e-6:
                print(f"warning: {p.name}: dense {k} loss {r['dense'][k]:.8f} differs from "
                      f"{result['dense'][k]:.8f}", flush=True)
        result["bases"].update(r["bases"])
        result["methods"].update(r["methods"])
        result["runs"] += r["runs"]
        result["determinism"] = result.get("determinism", []) + r.get("determinism", [])
    relabel(result)
    order = {m: i for i, m in enumerate(PAPER_METHODS)}
    result["methods"] = dict(sorted(result["methods"].items(), key=lambda kv: order.get(kv[0], len(order))))
    result["setting"]["lrs"] = sorted({r["lr"] for r in result["runs"]})
    result["wall_s"] = wall_s if wall_s is not None else max(walls)
    result["earlier_wall_s"] = max(earlier)
    if not result["earlier_wall_s"]:
        result.pop("earlier_wall_s")
    result["wall_note"] = wall_note or f"{len(parts)} worker processes in parallel; longest shown"
    result["parts"] = [p.name for p in parts]
    if notes is not None:
        result["notes"] = notes
    return result


def write(result: dict, folder) -> None:
    from qbara.atomic import write_json_atomic

    folder = Path(folder)
    write_json_atomic(folder / "finetune_quality_paper.json", result)
    (folder / "finetune_quality_paper.md").write_text(markdown(result) + "\n\n![](finetune_quality_paper.png)\n")
    plot(result, folder / "finetune_quality_paper.png")


def main(argv=None) -> None:
    args = options(argv)
    if args.combine:
        notes = json.loads(Path(args.notes).read_text()) if args.notes else None
        result = combine(args.combine, notes, args.wall_note, args.wall_s)
        write(result, args.combine)
        print(markdown(result))
        return
    if args.verify_lr is not None and not args.resume:
        raise SystemExit("--verify-lr re-runs a stored point: it needs --resume")
    if args.measure and args.resume:
        raise SystemExit("--measure times steps; it does not resume a result")
    result = run(args)
    if args.measure:
        return
    if args.out and not args.part:
        write(result, args.out)
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
