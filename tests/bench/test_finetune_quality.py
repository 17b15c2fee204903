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


def test_report_and_readme_summary_are_rewritten_from_saved_results(tmp_path, monkeypatch):
    """run_all --from-json redraws the plot and rewrites report.md from results.json alone; the README
    summary carries the table rows and the claim verdicts; a bad file gets one clear error."""
    import json

    import run_all

    args = finetune_quality.options(["--model", "tiny-llama", "--steps", "1", "--seeds", "0", "--held-out", "2",
                                     "--seq", "32", "--rank", "2", "--tasks", "shakespeare",
                                     "--methods", "qlora", "qbara"])
    result = finetune_quality.run(args)
    results = tmp_path / "results.json"
    meta = {"date": "2026-01-01", "machine": "test machine"}
    results.write_text(json.dumps({"command": "python bench/run_all.py --quick", "seconds": {"finetune": 60.0},
                                   "meta": meta, "finetune": result}))
    run_all.main(["--from-json", str(results)])
    report = (tmp_path / "report.md").read_text()
    assert "reduced setting" in report and "2026-01-01" in report and "test machine" in report
    assert finetune_quality.markdown(result) in report
    assert (tmp_path / "finetune_quality.png").stat().st_size > 5000
    summary = run_all.readme_summary({"finetune": result}, "CMD", {"finetune": 60.0}, meta, "out")
    assert "| QLoRA r2 | NF4 |" in summary and "Q-BaRA beats QLoRA" in summary and "out/report.md" in summary
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a results.json"):
        run_all.main(["--from-json", str(tmp_path / "bad.json")])
