"""FSDP (train.fsdp: full_shard) on CPU gloo ranks: per-rank memory and step time against one process.

For each model (a name load_model knows, or an HF folder such as bench/scale.py's random LLaMA checkpoints in
~/.cache/qbara/scale-models/1.1b) and each rank count N, N processes load the model (NF4, block 64, double quant;
LoRA r16 on every linear), shard it (N > 1: `qbara.train.fsdp.shard_model`, the model loaded within
`rank_local_loading` unless --load whole; N = 1: the plain single-process model, the reference) and train
`--steps` AdamW steps (after one warm-up step) on a fixed global batch split across the ranks. Each rank reports
its peak anonymous and resident memory while loading + preparing + sharding and while training (reset between),
the packed quantized bytes and all parameter bytes it holds (its local shards) and the median step time; the
ratios are against N = 1 in the same table. Each (model, N, load) case is written to --out/cases/ as it finishes
and is not run again (resumable; --rerun runs it again); the tables cover every case there. Then the projection:
per-rank bytes of the base and the adapter state for Llama-2-7B/13B and a 70B on N ranks (docs/distributed.md).

    PYTHONPATH=src python3 bench/fsdp.py --models tiny-llama smollm2-135m --ranks 1 2 4 --out bench/results/fsdp
    PYTHONPATH=src python3 bench/fsdp.py --models ~/.cache/qbara/scale-models/1.1b --ranks 1 2 4 --steps 2 \
        --out bench/results/fsdp

CPU ranks share this machine's cores, so the step times say what the all-gathers cost here, not on GPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from qbara import AdapterConfig, QuantConfig, load_model, prepare
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.train.fsdp import local_packed_bytes, rank_local_loading, shard_model

from measure import (
    PeakAnon,
    proc_status_bytes,
    release_freed_memory,
    reset_peak_memory,
    timed_training_steps,
    version,
)

QUANT = QuantConfig("nf4", block_size=64, double_quant=True)
RANK = 16
# name -> (hidden, intermediate, layers, kv width, vocab): Llama-2 7B / 13B, a Llama-2-70B (GQA, 8 KV heads)
SHAPES = {"7B": (4096, 11008, 32, 4096, 32000), "13B": (5120, 13824, 40, 5120, 32000),
          "70B": (8192, 28672, 80, 1024, 32000)}
ADAPTER_STATE_BYTES = 16  # fp32 weight + gradient + AdamW's two moments, per adapter parameter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parameter_count(model) -> int:
    """The model's parameters: each quantized weight counted as its d_out x d_in weights (not its packed bytes,
    which are parameters under FSDP and buffers without), every other parameter (adapters included) as itself."""
    packed = {id(getattr(m, n)) for m in model.modules() if isinstance(m, QuantizedLinear) for n in m._buffer_names}
    weights = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return weights + sum(p.numel() for p in model.parameters() if id(p) not in packed)


def label(model: str) -> str:
    """A short name for a model argument: a folder's name (random-1.1b for bench/scale.py's), else the name."""
    path = Path(model).expanduser()
    if path.is_dir():
        return f"random-{path.name}" if path.parent.name == "scale-models" else path.name
    return model


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local_load = world > 1 and args.load == "local"
        release_freed_memory()
        before_load = proc_status_bytes("RssAnon")
        reset_peak_memory("cpu")
        with PeakAnon() as load_anon:
            with rank_local_loading() if local_load else contextlib.nullcontext():
                model = load_model(str(Path(args.model).expanduser()), quant=QUANT)[0]
            model = prepare(model, QUANT, AdapterConfig(method="lora", rank=RANK))
            model.train()
            if world > 1:
                shard_model(model)
        load_peak_rss = proc_status_bytes("VmHWM")
        local_packed, total_packed = local_packed_bytes(model)
        tensors = list(model.parameters()) + list(model.buffers())  # 1 rank: the packed storage is buffers
        held = sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)
        total_params = parameter_count(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        mine = ids.chunk(world)[rank]
        release_freed_memory()
        reset_peak_memory("cpu")
        with PeakAnon() as anon:
            times, loss = timed_training_steps(model, mine, optimizer, args.steps + 1)
        row = {"model": label(args.model), "ranks": world, "rank": rank, "load": "local" if local_load else "whole",
               "parameters": total_params, "packed_bytes_total": total_packed, "packed_bytes_local": local_packed,
               "weight_bytes_local": held, "anon_before_load": before_load, "load_peak_anon": load_anon.peak,
               "load_peak_rss": load_peak_rss, "peak_rss": proc_status_bytes("VmHWM"), "peak_anon": anon.peak,
               "step_s": statistics.median(times[1:]), "loss": loss}
        Path(out, f"{rank}.json").write_text(json.dumps(row))
    finally:
        if world > 1:
            dist.destroy_process_group()


def case_path(cases: Path, model: str, world: int, load: str) -> Path:
    return cases / f"{label(model)}-{world}-{load if world > 1 else 'whole'}.json"


def measure(args, cases: Path) -> None:
    """Run each (model, N) case not yet in `cases` (one JSON list of rank rows per case, written when done)."""
    cases.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for world in args.ranks:
            path = case_path(cases, name, world, args.load)
            if path.is_file() and not args.rerun:
                print(f"{path.name}: measured already", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run_args = argparse.Namespace(**{**vars(args), "model": name})
                mp.spawn(worker, args=(world, _free_port(), run_args, tmp), nprocs=world, join=True)
                rows = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*.json"))]
            path.write_text(json.dumps(rows, indent=1))
            print(f"{name} on {world} rank(s): done", file=sys.stderr)


def all_rows(cases: Path) -> list[dict]:
    rows = [r for p in cases.glob("*.json") for r in json.loads(p.read_text())]
    return sorted(rows, key=lambda r: (r["parameters"], r["model"], r["ranks"], r["load"], r["rank"]))


def projection(ranks=(1, 2, 4, 8)) -> list[dict]:
    """Per-rank bytes of the sharded base + adapter state (not activations) for the SHAPES, on N ranks."""
    bits = QUANT.bits_per_param
    rows = []
    for name, (h, inter, layers, kv, vocab) in SHAPES.items():
        linears = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # (out, in)
        per_layer = sum(o * i for o, i in linears)
        quantized = layers * per_layer
        dense = 2 * vocab * h  # embeddings and lm_head, bf16 (norms are noise)
        adapter = layers * sum(RANK * (o + i) for o, i in linears)
        total = quantized + dense
        gathered = 2 * per_layer * bits / 8 + max(o * i for o, i in linears) * 2  # 2 layers in flight + 1 bf16 W
        in_hand = vocab * h * 2  # loading rank-locally: the largest tensor read whole (embeddings, bf16)
        for n in ranks:
            base = (quantized * bits / 8 + dense * 2) / n
            state = adapter * ADAPTER_STATE_BYTES / n
            rows.append({"model": name, "ranks": n, "parameters": total, "base_gib": base / 2**30,
                         "adapter_state_gib": state / 2**30, "transient_gib": gathered / 2**30,
                         "load_gib": (base + in_hand) / 2**30, "per_rank_gib": (base + state + gathered) / 2**30,
                         "bytes_per_param": (base + state + gathered) / total})
    return rows


def markdown(rows: list[dict], proj: list[dict]) -> str:
    ref = {r["model"]: r for r in rows if r["ranks"] == 1}
    mib = 2**20
    lines = ["Per rank, against one process (N = 1) of the same model; B/param: bytes per parameter of the whole "
             "model (base + adapter), so they fall as 1/N where a quantity is sharded.", "",
             "| model | params | ranks | rank | load | packed MiB held (of total) | all weights MiB held (B/param) "
             "| load peak anon MiB (vs 1) | load peak RSS MiB (vs 1) | train peak anon MiB (vs 1) "
             "| train peak RSS MiB (vs 1) | step s (vs 1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def vs(r, b, key):
        return f"{r[key] / mib:.0f} ({r[key] / b[key]:.2f})" if key in r and key in b else "-"

    for r in rows:
        b = ref.get(r["model"])
        if b is None:
            continue
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:,.1f} M | {r['ranks']} | {r['rank']} | {r['load']} "
                     f"| {r['packed_bytes_local'] / mib:.2f} ({r['packed_bytes_total'] / mib:.2f}) "
                     f"| {r['weight_bytes_local'] / mib:.1f} ({r['weight_bytes_local'] / r['parameters']:.3f}) "
                     f"| {vs(r, b, 'load_peak_anon')} | {vs(r, b, 'load_peak_rss')} | {vs(r, b, 'peak_anon')} "
                     f"| {vs(r, b, 'peak_rss')} | {r['step_s']:.2f} ({r['step_s'] / b['step_s']:.2f}) |")
    lines += ["", f"Projection ({QUANT.label}, {QUANT.bits_per_param:.3f} bits/param; bf16 embeddings and lm_head; "
              f"LoRA r{RANK} fp32 + AdamW; two decoder layers gathered + one bf16 weight in flight; no activations; "
              "load: the base share + the largest tensor in hand (embeddings, bf16), loading rank-locally; "
              "each rank also has ~0.3-0.5 GiB of Python, torch and transformers the formula leaves out.",
              "", "| model | ranks | load GiB/rank | base GiB/rank | adapter state GiB/rank | in flight GiB | GiB/rank "
              "| bytes/param |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['ranks']} | {p['load_gib']:.2f} | {p['base_gib']:.2f} | "
              f"{p['adapter_state_gib']:.3f} | {p['transient_gib']:.3f} | {p['per_rank_gib']:.2f} | "
              f"{p['bytes_per_param']:.3f} |" for p in proj]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        for load, style in (("local", "-"), ("whole", ":")):
            mine = [r for r in rows if r["model"] == name and (r["load"] == load or r["ranks"] == 1)]
            ranks = sorted({r["ranks"] for r in mine})
            if len(ranks) < 2:
                continue
            worst = [max((r for r in mine if r["ranks"] == n), key=lambda r: r["load_peak_anon"]) for n in ranks]
            tag = "" if load == "local" else " (whole load)"
            axes[0].plot(ranks, [r["weight_bytes_local"] / r["parameters"] for r in worst], "o" + style,
                         color=color, label=name + tag)
            axes[1].plot(ranks, [r["load_peak_anon"] / 2**20 for r in worst], "o" + style, color=color,
                         label=f"{name} load{tag}")
            if load == "local":
                axes[1].plot(ranks, [max(r["peak_anon"] for r in mine if r["ranks"] == n) / 2**20 for n in ranks],
                             "x--", color=color, alpha=0.5, label=f"{name} train")
                axes[2].plot(ranks, [r["step_s"] for r in worst], "o-", color=color, label=name)
    axes[0].set(xlabel="ranks", ylabel="weight bytes held / parameter", title="weights held per rank")
    axes[1].set(xlabel="ranks", ylabel="MiB", yscale="log", title="peak anonymous memory, largest rank")
    axes[2].set(xlabel="ranks", ylabel="median step s", yscale="log", title="step time (CPU gloo, shared cores)")
    for ax in axes:
        ax.set_xticks([1, 2, 4])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"],
                    help="names load_model knows or HF folders")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--load", choices=["local", "whole"], default="local",
                    help="N > 1: each rank loads only its rows (local) or the whole model before sharding (whole)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    ap.add_argument("--batch", type=int, default=4, help="global batch, split across the ranks")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each rank")
    ap.add_argument("--rerun", action="store_true", help="measure cases already in --out/cases again")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fsdp"),
                    help="folder for cases/, fsdp.json / fsdp.md / fsdp.png")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from --out/cases")
    args = ap.parse_args(argv)
    cases = args.out / "cases"
    if 1 not in args.ranks and not all(case_path(cases, m, 1, "whole").is_file() for m in args.models):
        ap.error("--ranks must include 1, the single-process reference, where it is not measured yet")
    if not args.report_only:
        measure(args, cases)
        print(f"load average while measuring: {os.getloadavg()} on {os.cpu_count()} CPUs", file=sys.stderr)
    rows, proj = all_rows(cases), projection()
    text = markdown(rows, proj)
    print(text)
    env = {"torch": torch.__version__, "transformers": version("transformers"), "cpus": os.cpu_count(),
           "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "fsdp.json").write_text(json.dumps({"rows": rows, "projection": proj, "env": env}, indent=1))
    (args.out / "fsdp.md").write_text(text)
    plot(rows, args.out / "fsdp.png")


if __name__ == "__main__":
    main()
