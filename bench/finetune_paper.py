"""Paper-faithful fine-tuning comparison on SmolLM2-135M: Q-BaRA vs QLoRA (NF4 + double quant) and QA-HiRA vs
QA-LoRA (INT4, groups of 32), with the authors' hyper-parameters, a per-method learning-rate sweep on a
validation split, several seeds and 2-SD verdicts.

    python bench/finetune_quality.py --paper --out bench/results          # or: python bench/finetune_paper.py
    # as run for bench/results/finetune_quality_paper.*: one single-thread worker per method, then join
    for m in qlora qbara qalora qahira; do
        OMP_NUM_THREADS=1 nice -n 15 python bench/finetune_paper.py --out DIR --methods $m --part $m &
    done; wait
    python bench/finetune_paper.py --combine DIR                          # join the parts: json, md, png

Protocol (the authors' reference code, SPEC §2): rank 64, alpha 16 (scaling s = 0.25) for every method, dropout
0, AdamW (no weight decay), lr constant after a linear warm-up over 3 % of the steps, gradient norm clipped at
0.3. QA-LoRA keeps rank 64 (on SmolLM2 its A has d_in/32 = 18 or 48 columns, so its rank is capped there);
QA-HiRA's output repetition is chosen per layer to come closest to LoRA r64's count, which on 576-wide layers
is the full group-constant matrix (d_out x d_in/32) and still has fewer parameters — every row states its count
and each comparison says by how much the counts differ. Per method: every lr of the grid is trained with seed 0
and scored on the validation split (disjoint from the held-out split); the best lr is then trained with every
seed (seed -> prepare -> train: the seed draws the adapter initialisation and the data order; the seed-0 run of
the sweep is reused, it is the same run). Reported: held-out loss (mean ± SD over seeds) of the adapter model and
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
import json
import math
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import finetune_quality as fq

PAPER_METHODS = ("qlora", "qbara", "qalora", "qahira", "qahira-tile")
CLAIMS = (("qbara", "qlora", "Q-BaRA beats QLoRA (NF4, equal trainable parameters)"),
          ("qahira", "qalora", "QA-HiRA beats QA-LoRA (INT4 G32)"),
          ("qahira-tile", "qalora", "QA-HiRA (authors' 4x8 tile) beats QA-LoRA (INT4 G32)"))


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["qlora", "qbara", "qalora", "qahira"], choices=PAPER_METHODS)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3])
    ap.add_argument("--steps", type=int, default=60, help="steps of every run (sweep and seeds)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="tokens per Shakespeare chunk")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
    ap.add_argument("--out", help="results folder")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.qalora_rank_match = False  # QA-LoRA at rank 64, as the authors ran it
    return args


# --------------------------------------------------------------------------------------------------
# Data and evaluation


def splits(tokenizer, seq: int, val: int, held: int):
    """Hamlet in `seq`-token chunks: train, then `val` validation chunks, then `held` held-out chunks (disjoint)."""
    from qbara.data import shakespeare_text
    from qbara.train.data import Example

    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False).input_ids
    chunks = [Example(ids[i:i + seq], ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]
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
            lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight = torch.nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
            if module.bias is not None:
                lin.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            set_submodule(model, name, lin)
            swapped.append((name, module))
    try:
        yield model
    finally:
        for name, module in swapped:
            set_submodule(model, name, module)


def loss_on(model, examples, args) -> float:
    from qbara.commands.eval import masked_loss

    model.eval()
    with torch.no_grad(), dequantized_once(model):
        return masked_loss(model, examples, args.eval_batch)["loss"]


# --------------------------------------------------------------------------------------------------
# Runs


def one_run(prepared, method, data, args, lr: float, seed: int, full: bool) -> dict:
    """seed -> prepare -> train at `lr`; validation loss, and with `full` the held-out loss of the adapter model
    and of its merged form."""
    train, val, held = data
    start = time.perf_counter()
    model = fq.fresh_model(prepared, seed)
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
        out["merge"], out["fold_rounding"] = "fold", model.qbara_fold_rounding
    else:
        fq.requantize_merge(model)
        out["merge"] = "re-quantized"
    out["merged"] = loss_on(model, held, args)


def run(args, dense=None, tokenizer=None) -> dict:
    from qbara.adapters import trainable_parameter_count
    from qbara.atomic import write_json_atomic
    from qbara.models import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if dense is None:
        dense, tokenizer = load_model(args.model)
    data = splits(tokenizer, args.seq, args.val, args.held_out)
    path = Path(args.out) / f"finetune_quality_paper{'.' + args.part if args.part else ''}.json" if args.out else None
    result = {"setting": {k: getattr(args, k) for k in ("model", "rank", "alpha", "dropout", "lrs", "steps", "batch",
                                                         "seq", "seeds", "warmup", "clip", "threads")},
              "data": {"task": "shakespeare (hamlet)", "train": len(data[0]), "val": len(data[1]),
                       "held_out": len(data[2])},
              "optimizer": "AdamW (betas 0.9/0.999, no weight decay), lr constant after linear warm-up",
              "dense": {"val": loss_on(dense, data[1], args), "held": loss_on(dense, data[2], args)},
              "bases": {}, "methods": {}, "runs": []}
    print(f"dense: val {result['dense']['val']:.4f} held-out {result['dense']['held']:.4f}", flush=True)

    def save():
        result["wall_s"] = time.perf_counter() - t0
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, result)

    for method in args.methods:
        prepared = fq.prepare_method(method, dense, tokenizer, args, seed=args.seeds[0])
        if prepared.base not in result["bases"]:
            result["bases"][prepared.base] = {"val": loss_on(prepared.quantized, data[1], args),
                                              "held": loss_on(prepared.quantized, data[2], args)}
            print(f"base {prepared.base}: held-out {result['bases'][prepared.base]['held']:.4f}", flush=True)
        entry = {"label": prepared.label, "base": prepared.base, "trainable": trainable_parameter_count(prepared.model),
                 "adapter": repr(prepared.adapter)}
        result["methods"][method] = entry
        if args.measure:
            model = fq.fresh_model(prepared, 0)
            with dequantized_once(model):
                saved = args.steps
                args.steps = args.measure
                curve, step_s = fq.train_steps(model, data[0], args.measure, args.batch, args.lrs[0], 0, "cpu",
                                               warmup=args.warmup, clip=args.clip)
                args.steps = saved
            entry["measured_step_s"] = step_s
            print(f"{prepared.label}: {step_s:.2f} s/step (batch {args.batch} x {args.seq})", flush=True)
            continue
        best = None  # (val, lr, run, model)
        for lr in args.lrs:
            r, model = one_run(prepared, method, data, args, lr, args.seeds[0], full=False)
            r["phase"] = "sweep"
            result["runs"].append(r)
            print(f"{prepared.label:22s} lr {lr:.0e} seed {args.seeds[0]}: val {r['val']:.4f} "
                  f"({r['step_s']:.2f} s/step, {r['seconds']:.0f} s)", flush=True)
            if best is None or r["val"] < best[0]:
                best = (r["val"], lr, r, model)
            del model
            save()
        _, lr, r0, model0 = best
        entry["best_lr"] = lr
        finish(model0, method, r0, data[2], args)  # the sweep's seed-0 run at the chosen lr is the seed-0 run
        r0["phase"] = "sweep+final"
        del model0, best
        save()
        for seed in args.seeds[1:]:
            r, _ = one_run(prepared, method, data, args, lr, seed, full=True)
            r["phase"] = "final"
            result["runs"].append(r)
            save()
        s = summary(result, method)
        print(f"{prepared.label:22s} best lr {lr:.0e}: held-out {s['held']:.4f} ± {s['held_sd']:.4f} "
              f"merged {s.get('merged', float('nan')):.4f}", flush=True)
        del prepared
    save()
    return result


# --------------------------------------------------------------------------------------------------
# Report


def final_runs(result: dict, method: str) -> list[dict]:
    lr = result["methods"][method].get("best_lr")
    return [r for r in result["runs"] if r["method"] == method and r["lr"] == lr and "held" in r]


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


def markdown(result: dict) -> str:
    st, d = result["setting"], result["data"]
    lines = [f"**Paper setting** ({st['model']}, {d['task']}, {d['train']} train / {d['val']} validation / "
             f"{d['held_out']} held-out chunks of {st['seq']} tokens): rank {st['rank']}, alpha {st['alpha']:g} "
             f"(s = {st['alpha'] / st['rank']:g}), dropout {st['dropout']:g}, AdamW, lr constant after "
             f"{st['warmup']:.0%} warm-up, grad-clip {st['clip']:g}, batch {st['batch']} x {st['seq']} tokens, "
             f"{st['steps']} steps, lr grid {', '.join(f'{x:g}' for x in st['lrs'])} (seed {st['seeds'][0]}, "
             f"chosen on validation loss), then seeds {st['seeds']} at the chosen lr; {st['threads']} torch "
             f"thread(s) per worker; wall {result.get('wall_s', 0) / 60:.0f} min"
             + (f" ({result['wall_note']})" if result.get("wall_note") else "") + ".",
             "", f"Dense (unquantized) step-0 held-out loss: **{result['dense']['held']:.4f}**; bases at step 0: "
             + ", ".join(f"{k} {v['held']:.4f} ({v['held'] - result['dense']['held']:+.4f} vs dense)"
                         for k, v in result["bases"].items()) + ".", "",
             "Validation loss per lr (seed 0; the chosen lr in bold):", "",
             "| method | " + " | ".join(f"lr {x:g}" for x in st["lrs"]) + " |",
             "|---|" + "---|" * len(st["lrs"])]
    for method, e in result["methods"].items():
        cells = []
        for lr in st["lrs"]:
            v = [r["val"] for r in result["runs"] if r["method"] == method and r["lr"] == lr and r["seed"] ==
                 st["seeds"][0]]
            c = f"{v[0]:.4f}" if v else "–"
            cells.append(f"**{c}**" if lr == e.get("best_lr") and v else c)
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
    lines += ["", "Claims (counted only when the gap exceeds 2 SD of the difference, sqrt(SD_a² + SD_b²)):"]
    for v in verdicts(result):
        m = result["methods"]
        la, lb = m[v["a"]]["label"], m[v["b"]]["label"]
        lines.append(f"- {v['claim']}: **{v['verdict']}** — {la} {v['a_held']:.4f} vs {lb} {v['b_held']:.4f}, "
                     f"gap {v['gap']:+.4f} (positive favours {la}), 2 SD = {2 * v['sd']:.4f} (paired-by-seed SD "
                     f"{v['paired_sd']:.4f}); trainable parameters {m[v['a']]['trainable']:,} vs "
                     f"{m[v['b']]['trainable']:,} ({v['trainable_diff']:+.1%}).")
        edge = [m[k]["label"] for k in (v["a"], v["b"]) if m[k]["best_lr"] in (min(st["lrs"]), max(st["lrs"]))]
        if edge:
            lines[-1] += (f" Caveat: the chosen lr of {' and '.join(edge)} is at the edge of the grid, so "
                          f"{'its' if len(edge) == 1 else 'their'} best lr may lie outside it.")
    if result.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Left: validation loss vs lr per method (seed 0). Right: held-out loss at the chosen lr (mean ± SD), with
    the dense and each base's step-0 losses as lines."""
    from qbara.plotting import pyplot, save_figure

    st = result["setting"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(13, 4.8))
    for method, e in result["methods"].items():
        pts = sorted((r["lr"], r["val"]) for r in result["runs"] if r["method"] == method and r["seed"] ==
                     st["seeds"][0])
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=e["label"])
    ax1.set_xscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel(f"validation loss after {st['steps']} steps (seed {st['seeds'][0]})")
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


def combine(folder) -> dict:
    """Join the workers' part files into one result (methods and runs; dense/bases from every part)."""
    folder = Path(folder)
    parts = sorted(folder.glob("finetune_quality_paper.*.json"))
    if not parts:
        raise SystemExit(f"no finetune_quality_paper.*.json parts in {folder}")
    result = None
    walls = []
    for p in parts:
        r = json.loads(p.read_text())
        walls.append(r.get("wall_s", 0.0))
        if result is None:
            result = r
            continue
        result["bases"].update(r["bases"])
        result["methods"].update(r["methods"])
        result["runs"] += r["runs"]
    order = {m: i for i, m in enumerate(PAPER_METHODS)}
    result["methods"] = dict(sorted(result["methods"].items(), key=lambda kv: order.get(kv[0], len(order))))
    result["wall_s"] = max(walls)
    result["wall_note"] = f"{len(parts)} worker processes in parallel; longest shown"
    result["parts"] = [p.name for p in parts]
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
        result = combine(args.combine)
        write(result, args.combine)
        print(markdown(result))
        return
    result = run(args)
    if args.measure:
        return
    if args.out and not args.part:
        write(result, args.out)
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
