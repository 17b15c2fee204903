"""Double-quantized NF codes rounded against the stored scale ŝ (qbara's order) against the older order (codes
from the exact absmax s, then s double-quantized to ŝ and the codes dequantized with it), on every linear of
SmolLM2-135M whose size is a multiple of 64 x 256 (its 90 MLP projections; q/k/v/o are not): the ratio of
squared quantization errors older / stored-scale per matrix (>= 1: the stored-scale codes are the nearest levels
of w / ŝ, so never worse).

    nice -n 10 python bench/nf_stored_scale.py [--out bench/results/nf_stored_scale.md]

Blocks of 64 with the scales double-quantized in groups of 256 (QLoRA's layout) at b0 = 2 / 3 / 4 / 8 bits of
scale (fp32 group maxima), for NF2 / NF3 / NF4 / NF8.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from qbara.models import load_model
from qbara.quant.double_quant import stored_scales
from qbara.quant.nf import block_absmax, nf_values, quantize_nf_values, scale_blocks

BLOCK, GROUP = 64, 256


def error_ratio(W: torch.Tensor, bits: int, b0: int) -> float:
    """||W - older||² / ||W - stored-scale||² for one matrix."""
    s = block_absmax(W, BLOCK)
    s_hat = stored_scales(s, b0, GROUP, "fp32")
    older = (nf_values(scale_blocks(W, BLOCK, s), bits) * s_hat[:, None]).view(W.shape)
    stored = quantize_nf_values(W, bits, BLOCK, s_hat)[2]
    return float((W - older).square().sum() / (W - stored).square().sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nf_stored_scale.md")
    args = ap.parse_args(argv)
    model, _ = load_model(args.model)
    weights = [p.detach().float() for n, p in model.named_parameters()
               if n.endswith("proj.weight") and p.numel() % (BLOCK * GROUP) == 0]
    lines = [f"# NF codes against the stored scale vs the older order ({args.model}, {len(weights)} linears)", "",
             f"`python bench/nf_stored_scale.py`. Squared quantization error of the older order (codes from the "
             f"exact absmax, scales double-quantized afterwards) over qbara's (codes rounded against the stored "
             f"scale), per matrix; blocks of {BLOCK}, scales double-quantized in groups of {GROUP}, fp32 group "
             "maxima. Min / median / max over the matrices.", "",
             "| format | b0 = 2 | b0 = 3 | b0 = 4 | b0 = 8 |", "|---|---|---|---|---|"]
    for bits in (2, 3, 4, 8):
        cells = []
        for b0 in (2, 3, 4, 8):
            r = [error_ratio(W, bits, b0) for W in weights]
            cells.append(f"{min(r):.3f} / {statistics.median(r):.3f} / {max(r):.3f}")
            print(f"nf{bits} b0={b0}: {cells[-1]}", flush=True)
        lines.append(f"| nf{bits} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
