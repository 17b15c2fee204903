"""Weight rebuild speed: qbara's per-call dequantization (as forward/backward run it) vs bitsandbytes'
`dequantize_4bit`, on the shapes of a 1.1B / 7B LLaMA, interleaved, medians, ratios; then per training step
(every linear of one decoder layer: q, k, v, o, gate, up, down), the sum that a step pays per layer.

    python bench/dequant_speed.py            # needs bitsandbytes (pip install bitsandbytes)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {"1.1B attn": (2048, 2048), "1.1B kv": (256, 2048), "1.1B mlp": (5632, 2048), "1.1B down": (2048, 5632),
          "7B attn": (4096, 4096), "7B mlp": (11008, 4096), "7B down": (4096, 11008)}
LAYER = {  # shape label -> how many linears of a decoder layer have it (TinyLlama 1.1B, Llama-2-7B)
    "1.1B": {"1.1B attn": 2, "1.1B kv": 2, "1.1B mlp": 2, "1.1B down": 1},
    "7B": {"7B attn": 4, "7B mlp": 2, "7B down": 1},
}


def main(argv=None) -> dict:
    import bitsandbytes.functional as F

    from qbara.nn.quantized_linear import QuantizedLinear, _weight_for_matmul
    from qbara.quant.config import QuantConfig
    from qbara.quant.tensor import quantize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    results = {}
    for label, shape in SHAPES.items():
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        runs = {"qbara nf4": QuantizedLinear(quantize(weight, QuantConfig("nf4"))),
                "qbara int4-g32": QuantizedLinear(quantize(weight, QuantConfig("int4", 32)))}
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        calls = {name: (lambda layer=layer: _weight_for_matmul(layer, torch.float32)) for name, layer in runs.items()}
        calls["bnb nf4"] = lambda: F.dequantize_4bit(packed, state)
        times = {name: [] for name in calls}
        for name, call in calls.items():
            call()  # warm-up
        for _ in range(args.repeats):  # interleaved: the machine's noise hits every variant alike
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[label] = medians
        print(f"{label:10s} {shape[0]}x{shape[1]}: " + "  ".join(f"{n} {m * 1e3:.1f} ms" for n, m in medians.items()) +
              f"  | nf4/bnb {medians['qbara nf4'] / medians['bnb nf4']:.2f}x, "
              f"int4/bnb {medians['qbara int4-g32'] / medians['bnb nf4']:.2f}x")
    for model, counts in LAYER.items():  # what a step pays per decoder layer (each weight rebuilt alike per call)
        totals = {name: sum(results[label][name] * n for label, n in counts.items()) for name in results[label]}
        results[f"{model} layer"] = totals
        print(f"{model} per layer (7 linears): " + "  ".join(f"{n} {t * 1e3:.1f} ms" for n, t in totals.items()) +
              f"  | nf4/bnb {totals['qbara nf4'] / totals['bnb nf4']:.2f}x, "
              f"int4/bnb {totals['qbara int4-g32'] / totals['bnb nf4']:.2f}x")
    return results


if __name__ == "__main__":
    main()
