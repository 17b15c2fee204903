"""The GGUF-mix benchmark's own arithmetic: llama.cpp-side NLL, the importance matrix, the tables and the plot."""
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gguf_mix  # noqa: E402

from qbara.models.tiny import tiny_llama  # noqa: E402


def test_window_nll_is_the_cross_entropy_of_the_next_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 17, generator=g, dtype=torch.float64) * 4
    ids = torch.randint(0, 17, (9,), generator=g).tolist()
    want = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    assert math.isclose(gguf_mix.nll(logits.numpy(), ids) * (len(ids) - 1), want, rel_tol=1e-12)


def test_window_nll_matches_qbara_perplexity_on_the_same_windows():
    model = tiny_llama(seed=1)[0].eval()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=g).tolist()
    with torch.no_grad():
        total = sum(gguf_mix.nll(model(torch.tensor([w])).logits[0].double().numpy(), w) * 15 for w in windows)
    assert math.isclose(gguf_mix.qbara_nll(model, windows), total / (3 * 15), rel_tol=1e-6)


def test_gguf_imatrix_names_every_decoder_linear_as_llama_cpp_does():
    model = tiny_llama(seed=2)[0].eval()
    importance = {n: torch.full((m.in_features,), float(i)) for i, (n, m) in enumerate(model.named_modules())
                  if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    imatrix = gguf_mix.gguf_imatrix(importance)
    assert len(imatrix) == 7 * len(model.model.layers) == len(importance)
    np.testing.assert_array_equal(imatrix["blk.1.ffn_down.weight"], importance["model.layers.1.mlp.down_proj"])
    np.testing.assert_array_equal(imatrix["blk.0.attn_q.weight"], importance["model.layers.0.self_attn.q_proj"])
    assert len({float(v[0]) for v in imatrix.values()}) == len(imatrix)  # one source tensor per name


def test_markdown_and_plot_pick_the_best_stock_file_under_each_budget(tmp_path):
    def row(kind, name, bits, ppl, **extra):
        return {"kind": kind, "name": name, "bits": bits, "nll_llama": math.log(ppl), "nll_qbara": math.log(ppl),
                "types": {"Q4_0": 1}, **extra}

    data = {"setting": {"window": 512, "windows": 4}, "rows": {
        "dense:f32": {"kind": "dense", "name": "f32", "nll_qbara": math.log(40.0), "params": 100, "bits": 32.0,
                      "types": {"F32": 1}},
        "stock:Q4_0": row("stock", "Q4_0", 5.3, 60.0),
        "stock+imatrix:Q4_0": row("stock+imatrix", "Q4_0", 5.3, 50.0),
        "stock:Q5_0": row("stock", "Q5_0", 6.1, 45.0),
        "qbara-ilp+fisher:5.300": row("qbara-ilp+fisher", "5.300", 5.29, 48.0, budget=5.3)}}
    text = gguf_mix.markdown(data)
    assert "| 5.300 | stock+imatrix Q4_0 50.000 | 48.000 | - | - | - |" in text  # Q5_0 (6.1) is over the budget
    # a paired row against a smaller stock file (no stock file of the budget's size) says so
    data["rows"]["qbara+imatrix:6.000"] = row("qbara+imatrix", "6.000", 6.0, 44.0, budget=6.0)
    data["paired"] = {"qbara+imatrix:6.000": {"stock": "stock+imatrix:Q4_0", "windows": 4, "mean_diff": -0.1,
                                              "se": 0.01, "ppl_ratio": 0.9, "verdict": "qbara better"},
                      "qbara-ilp+fisher:5.300": {"stock": "stock+imatrix:Q4_0", "windows": 4, "mean_diff": -0.1,
                                                 "se": 0.01, "ppl_ratio": 0.9, "verdict": "qbara better"}}
    text = gguf_mix.markdown(data)
    assert ("| qbara+imatrix:6.000 | stock+imatrix:Q4_0 (5.300) | 4 | -0.1000 ± 0.0100 | 0.9000 | qbara better; the "
            "stock file is 0.700 bits/param smaller: not an equal-size comparison |") in text
    assert "| qbara-ilp+fisher:5.300 | stock+imatrix:Q4_0 (5.300) | 4 | -0.1000 ± 0.0100 | 0.9000 | qbara better |" \
        in text  # 5.29 bits against 5.3: not larger, no note
    assert gguf_mix.plot(data, tmp_path / "p.png").stat().st_size > 0


def test_paired_difference_gives_a_verdict_only_beyond_two_standard_errors():
    g = np.random.default_rng(0)
    reference = 3.8 + g.normal(0, 0.3, 100)  # windows differ a lot; the paired difference is what counts
    noise = g.normal(0, 0.01, 100)
    better = gguf_mix.paired_difference(reference - 0.01 + noise, reference)
    assert better["verdict"] == "qbara better" and better["windows"] == 100
    assert math.isclose(better["mean_diff"], -0.01 + noise.mean(), rel_tol=1e-9)
    assert math.isclose(better["se"], noise.std(ddof=1) / 10, rel_tol=1e-9)
    assert math.isclose(better["ppl_ratio"], math.exp(better["mean_diff"]))
    assert gguf_mix.paired_difference(reference + 0.01 + noise, reference)["verdict"] == "stock better"
    assert gguf_mix.paired_difference(reference + noise, reference)["verdict"] == "inconclusive"


def test_spread_keeps_both_ends_and_at_most_n():
    assert gguf_mix.spread([1, 2, 3, 4, 5], 3) == [1, 3, 5]
    assert gguf_mix.spread([1, 2], 3) == [1, 2]
    assert gguf_mix.spread([1, 2, 3], 1) == [3] and gguf_mix.spread([1, 2, 3], 0) == []
