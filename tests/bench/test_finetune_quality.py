"""The fine-tuning benchmark on a tiny model: folds reproduce the adapter (and report their fp16 rounding), re-quantized merges move it,
and the report states every paper claim it checks."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import finetune_quality  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def test_tiny_run_reports_folds_and_requantized_merges(tmp_path):
    args = finetune_quality.options(["--model", "tiny-llama", "--steps", "2", "--seeds", "0", "1", "--held-out", "4",
                                     "--seq", "64", "--gsm-length", "900", "--rank", "4", "--lq-configs", "qlora",
                                     "--tasks", "shakespeare", "--lr", "1e-2", "--out", str(tmp_path),
                                     "--methods", "qlora", "qbara", "qahira", "loftq", "lq-3.25"])
    result = finetune_quality.run(args)
    runs = {m: e["runs"]["shakespeare"] for m, e in result["methods"].items()}
    for r in runs["qahira"]:
        assert r["merge"] == "fold" and r["merged"] == pytest.approx(r["after"], rel=1e-4)
        assert 0 <= r["fold_rounding"] < 0.05  # lr 1e-2: updates far above the fp16 minima's step
    for r in runs["qlora"]:
        assert r["merge"] == "re-quantized" and r["merged"] != r["after"]
    # The same data order and seed give the same step-0 loss for methods on the same (NF4) base.
    assert runs["qlora"][0]["before"] == runs["qbara"][0]["before"]
    assert result["methods"]["lq-3.25"]["base"].startswith("LQ 3.")
    text = finetune_quality.markdown(result)
    assert "Q-BaRA beats QLoRA" in text and "minima rounding error" in text
    assert (tmp_path / "finetune_quality.png").stat().st_size > 5000
