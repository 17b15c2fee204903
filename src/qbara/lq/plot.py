"""Picture of an LQ-LoRA allocation: bits per parameter of every matrix, by layer and module."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qbara.lq.layers import LQReport
from qbara.plotting import pyplot, save_figure

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_and_module(name: str) -> tuple[int, str]:
    """('model.layers.3.self_attn.q_proj') -> (3, 'q_proj'); names without a layer index get -1."""
    match = _LAYER.search(name)
    return (int(match.group(1)) if match else -1), name.rsplit(".", 1)[-1]


def plot_bits_per_layer(report: LQReport, path, title: str | None = None) -> Path:
    """Heat map (modules x layers) of each matrix's bits/param, with the mean per layer below it."""
    return plot_allocation({n: (layer.config.bits_per_param, layer.numel) for n, layer in report.layers.items()}, path,
                           title or f"{report.method.upper()} allocation: {report.bits_per_param:.3f} bits/param "
                                    f"(rank {report.rank}{', Fisher' if report.fisher else ''})")


def plot_allocation(bits: dict, path, title: str) -> Path:
    """`plot_bits_per_layer` for matrix name -> (bits/param, parameters)."""
    cells = {_layer_and_module(n): b for n, (b, _) in bits.items()}
    layers = sorted({k[0] for k in cells})
    modules = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: (k[0], k[1]))))
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    modules.sort(key=lambda m: (order.index(m) if m in order else len(order), m))
    grid = np.full((len(modules), len(layers)), np.nan)
    for (layer, module), b in cells.items():
        grid[modules.index(module), layers.index(layer)] = b
    numel = {_layer_and_module(n): count for n, (_, count) in bits.items()}
    means = [sum(cells[k] * numel[k] for k in cells if k[0] == layer) / sum(numel[k] for k in cells if k[0] == layer)
             for layer in layers]
    mean = sum(cells[k] * numel[k] for k in cells) / sum(numel.values())

    plt = pyplot()
    width = max(6.0, 0.28 * len(layers) + 2.5)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width, 1.2 + 0.42 * len(modules) + 2.0),
                                  gridspec_kw={"height_ratios": [max(len(modules), 1), 3]}, sharex=True,
                                  layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), modules)
    fig.colorbar(image, ax=[ax, ax2], label="bits / parameter", fraction=0.04)
    ax.set_title(title)
    ax2.bar(range(len(layers)), means, color="tab:blue")
    ax2.axhline(mean, color="k", lw=1, ls="--", label="model mean")
    ax2.set_ylabel("layer mean")
    ax2.set_ylim(min(means) * 0.9 if means else 0, max(means) * 1.05 if means else 1)
    ax2.set_xticks(range(len(layers)), [str(x) if x >= 0 else "other" for x in layers],
                   fontsize=7 if len(layers) > 20 else 9)
    ax2.set_xlabel("layer")
    ax2.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
