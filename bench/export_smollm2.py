"""Benchmark: a QA-HiRA "fine-tune" of SmolLM2 exported as a Q4_1 GGUF and loaded back.

SmolLM2 -> prepare(INT4 G32, QA-HiRA rank 8) -> adapter weights set to small random values (training is
not wired in yet) -> perplexity of the adapter model -> merge into the quantized base -> export GGUF ->
reload the GGUF through transformers (qbara.load_model) -> perplexity again. Prints the file sizes of
the shipped and exported GGUF and three perplexities: shipped model, adapter model, exported GGUF.

The random update: QA-HiRA's Delta W is s * M / G on tiles of pool_out x G (s = alpha / rank, G = 32),
so with M ~ N(0, std^2) a layer gets ||Delta W||_F / ||W||_F = s * std / (G * rms(W)). std is chosen per
layer so that this ratio is --rel-update (default 1%), the order of magnitude of the weight change of a
short LoRA-style fine-tune; it moves perplexity a little (random, not learned), which is what lets the
adapter model and the exported file be told apart from the shipped one.

    python bench/export_smollm2.py [--rel-update 0.01] [--window 512] [--tokens 4096] [--out DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qbara import AdapterConfig, QuantConfig, merge, prepare
from qbara.adapters import adapter_layers
from qbara.data import shakespeare_text
from qbara.eval import perplexity
from qbara.export import export_gguf
from qbara.models import load_model
from qbara.models.smollm2 import smollm2_gguf_path


@torch.no_grad()
def randomize_hira(model, rel_update: float, seed: int) -> float:
    """Set every QA-HiRA matrix M so that ||Delta W|| / ||W|| = rel_update per layer; returns the mean std."""
    gen = torch.Generator().manual_seed(seed)
    stds = []
    for layer in adapter_layers(model).values():
        w_rms = layer.base_weight().pow(2).mean().sqrt().item()
        std = rel_update * layer.pool_in * w_rms / layer.scaling
        layer.hira_M.weight.copy_(torch.randn(layer.hira_M.weight.shape, generator=gen) * std)
        stds.append(std)
    return sum(stds) / len(stds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rel-update", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the exported GGUF (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model, tokenizer = load_model("smollm2-135m")
    ids = torch.tensor(tokenizer(shakespeare_text(args.play), add_special_tokens=False)["input_ids"])

    def ppl(m) -> float:
        return perplexity(m, ids, window=args.window, max_tokens=args.tokens, progress=False).ppl

    t = time.perf_counter()
    ppl_shipped = ppl(model)
    print(f"shipped SmolLM2 (dequantized Q4_1)   ppl {ppl_shipped:.4f}   ({time.perf_counter() - t:.0f} s)")

    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=args.rank))
    std = randomize_hira(model, args.rel_update, args.seed)
    delta = [(layer.delta_weight().norm() / layer.base_weight().norm()).item()
             for layer in adapter_layers(model).values()]
    print(f"QA-HiRA rank {args.rank}: M ~ N(0, std^2), mean std {std:.3e}; ||dW||/||W|| = "
          f"{min(delta):.4f}..{max(delta):.4f} over {len(delta)} layers")
    t = time.perf_counter()
    ppl_adapter = ppl(model)
    print(f"adapter model (INT4 G32 + QA-HiRA)   ppl {ppl_adapter:.4f}   ({time.perf_counter() - t:.0f} s)")

    merge(model, into="quantized")
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qbara-export-"))
    path = out_dir / "smollm2-qahira-Q4_1.gguf"
    report = export_gguf(model, tokenizer, path)
    print(report.summary())

    t = time.perf_counter()
    reloaded, _ = load_model(str(path))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl_gguf = ppl(reloaded)
    print(f"exported GGUF, reloaded ({load_s:.0f} s)   ppl {ppl_gguf:.4f}   ({time.perf_counter() - t:.0f} s)")

    shipped_size = smollm2_gguf_path().stat().st_size
    print("\n| file | bytes |\n|---|---|")
    print(f"| shipped SmolLM2-135M-Instruct.Q4_1.gguf | {shipped_size:,} |")
    print(f"| exported {path.name} | {report.size_bytes:,} ({report.size_bytes - shipped_size:+,}) |")
    print("\n| model | perplexity |\n|---|---|")
    print(f"| shipped | {ppl_shipped:.4f} |\n| adapter (unmerged) | {ppl_adapter:.4f} |\n"
          f"| exported GGUF | {ppl_gguf:.4f} |")
    print(f"\n{args.play}, window {args.window}, {args.tokens} tokens; exported vs adapter: "
          f"{(ppl_gguf / ppl_adapter - 1) * 100:+.4f}%")


if __name__ == "__main__":
    main()
