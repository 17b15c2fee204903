"""FSDP (train.fsdp: full_shard) on CPU gloo ranks: per-rank memory and step time against one process.

For each model and each rank count N, N processes load the model (NF4, block 64, double quant; LoRA r16 on every
linear), shard it (N > 1: `qbara.train.fsdp.shard_model`; N = 1: the plain single-process model, the reference) and
train `--steps` AdamW steps on a fixed global batch split across the ranks. Each rank reports the packed quantized
bytes and all parameter bytes it holds (its local shards), its peak resident memory while training (VmHWM, reset
after loading and sharding), its peak anonymous memory, and the median step time. The ratios are against N = 1 in the
same run. Then the projection: per-rank bytes of the base and the adapter state for Llama-2-7B/13B and a 70B on N
ranks, from the same formula the measured rows follow (docs/distributed.md).

    PYTHONPATH=src python3 bench/fsdp.py --models tiny-llama smollm2-135m --ranks 1 2 --out bench/results/fsdp

CPU ranks share this machine's cores, so the step times say what the all-gathers cost here, not on GPUs.
"""
from __future__ import annotations

import argparse
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
from qbara.train.fsdp import local_packed_bytes, shard_model

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


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = prepare(load_model(args.model, quant=QUANT)[0], QUANT, AdapterConfig(method="lora", rank=RANK))
        model.train()
        if world > 1:
            shard_model(model)
        local_packed, total_packed = local_packed_bytes(model)
        tensors = list(model.parameters()) + list(model.buffers())  # 1 rank: the packed storage is buffers
        held = sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)
        total_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        mine = ids.chunk(world)[rank]
        release_freed_memory()
        load_peak = proc_status_bytes("VmHWM")  # every rank loads the whole quantized model before sharding
        reset_peak_memory("cpu")
        with PeakAnon() as anon:
            times, loss = timed_training_steps(model, mine, optimizer, args.steps + 1)
        row = {"model": args.model, "ranks": world, "rank": rank, "parameters": total_params,
               "packed_bytes_total": total_packed, "packed_bytes_local": local_packed, "weight_bytes_local": held,
               "load_peak_rss": load_peak, "peak_rss": proc_status_bytes("VmHWM"), "peak_anon": anon.peak,
               "step_s": statistics.median(times[1:]), "loss": loss}
        Path(out, f"{args.model}-{world}-{rank}.json").write_text(json.dumps(row))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(args) -> list[dict]:
    rows = []
    for name in args.models:
        for world in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                run_args = argparse.Namespace(**{**vars(args), "model": name})
                mp.spawn(worker, args=(world, _free_port(), run_args, tmp), nprocs=world, join=True)
                rows += [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*.json"))]
            print(f"{name} on {world} rank(s): done", file=sys.stderr)
    return rows


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
        for n in ranks:
            base = (quantized * bits / 8 + dense * 2) / n
            state = adapter * ADAPTER_STATE_BYTES / n
            rows.append({"model": name, "ranks": n, "parameters": total, "base_gib": base / 2**30,
                         "adapter_state_gib": state / 2**30, "transient_gib": gathered / 2**30,
                         "per_rank_gib": (base + state + gathered) / 2**30,
                         "bytes_per_param": (base + state + gathered) / total})
    return rows


def markdown(rows: list[dict], proj: list[dict]) -> str:
    ref = {r["model"]: r for r in rows if r["ranks"] == 1}
    lines = ["| model | ranks | rank | packed MiB held (of total) | ratio vs 1 | all weights MiB held (vs 1) "
             "| load peak RSS MiB | train peak RSS MiB (vs 1) | peak anon MiB (vs 1) | step s (vs 1) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = ref[r["model"]]
        share = r["packed_bytes_local"] / b["packed_bytes_local"]
        weights = r["weight_bytes_local"] / b["weight_bytes_local"]
        lines.append(f"| {r['model']} | {r['ranks']} | {r['rank']} | {r['packed_bytes_local'] / 2**20:.2f} "
                     f"({r['packed_bytes_total'] / 2**20:.2f}) | {share:.3f} "
                     f"| {r['weight_bytes_local'] / 2**20:.1f} ({weights:.2f}) | {r['load_peak_rss'] / 2**20:.0f} "
                     f"| {r['peak_rss'] / 2**20:.0f} "
                     f"({r['peak_rss'] / b['peak_rss']:.2f}) | {r['peak_anon'] / 2**20:.0f} "
                     f"({r['peak_anon'] / b['peak_anon']:.2f}) | {r['step_s']:.3f} ({r['step_s'] / b['step_s']:.2f}) |")
    lines += ["", f"Projection ({QUANT.label}, {QUANT.bits_per_param:.3f} bits/param; bf16 embeddings and lm_head; "
              f"LoRA r{RANK} fp32 + AdamW; two decoder layers gathered + one bf16 weight in flight; no activations):",
              "", "| model | ranks | base GiB/rank | adapter state GiB/rank | in flight GiB | GiB/rank | bytes/param |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['ranks']} | {p['base_gib']:.2f} | {p['adapter_state_gib']:.3f} | "
              f"{p['transient_gib']:.3f} | {p['per_rank_gib']:.2f} | {p['bytes_per_param']:.3f} |" for p in proj]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name and r["rank"] == 0]
        axes[0].plot([r["ranks"] for r in mine], [r["packed_bytes_local"] / 2**20 for r in mine], "o-", label=name)
        axes[1].plot([r["ranks"] for r in mine], [r["step_s"] for r in mine], "o-", label=name)
    axes[0].set(xlabel="ranks", ylabel="packed MiB held by rank 0", title="quantized base per rank")
    axes[1].set(xlabel="ranks", ylabel="median step s", title="step time (CPU gloo, shared cores)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="global batch, split across the ranks")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each rank")
    ap.add_argument("--out", type=Path, default=None, help="folder for fsdp.json / fsdp.md / fsdp.png")
    args = ap.parse_args(argv)
    if 1 not in args.ranks:
        ap.error("--ranks must include 1, the single-process reference")
    rows, proj = measure(args), projection()
    text = markdown(rows, proj)
    print(text)
    print(f"load average while measuring: {os.getloadavg()} on {os.cpu_count()} CPUs", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "transformers": version("transformers"), "cpus": os.cpu_count(),
               "args": {k: str(v) for k, v in vars(args).items()}}
        (args.out / "fsdp.json").write_text(json.dumps({"rows": rows, "projection": proj, "env": env}, indent=1))
        (args.out / "fsdp.md").write_text(text)
        plot(rows, args.out / "fsdp.png")


if __name__ == "__main__":
    main()
