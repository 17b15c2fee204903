"""The fine-tuning benchmark on a tiny model: folds reproduce the adapter (and report their fp16 rounding), re-quantized merges move it,
and the report states every paper claim it checks."""
import sys
from pathlib import Path

import pytest
import torch

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
    assert "Smoke test, not a verdict" in text and "smoke test (2 steps at one lr" in text
    assert (tmp_path / "finetune_quality.png").stat().st_size > 5000


def test_report_and_readme_summary_are_rewritten_from_saved_results(tmp_path, monkeypatch):
    """run_all --from-json redraws the plot and rewrites report.md from results.json alone; the summary that
    --readme writes into docs/benchmarks.md carries the table rows and leaves the superseded smoke-test claim
    lines to report.md; a bad file gets one clear error."""
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
    assert "| QLoRA r2 | NF4 |" in summary and "out/report.md" in summary
    # The smoke-test claim lines stay in report.md: the paper setting's verdicts supersede them.
    assert "Q-BaRA beats QLoRA" in report and "Q-BaRA beats QLoRA" not in summary and "supersede" in summary
    # --readme fills the section of docs/benchmarks.md between the markers and keeps the rest of the page.
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# head\n{run_all.README_START}\nold\n{run_all.README_END}\ntail\n")
    run_all.update_readme(summary, page)
    assert page.read_text() == f"# head\n{run_all.README_START}\n{summary.strip()}\n{run_all.README_END}\ntail\n"
    live = run_all.SUMMARY_FILE.read_text()
    assert run_all.SUMMARY_FILE.name == "benchmarks.md" and live.count(run_all.README_START) == 1
    assert live.count(run_all.README_END) == 1
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a results.json"):
        run_all.main(["--from-json", str(tmp_path / "bad.json")])


def test_every_seed_redraws_the_adapter_init_and_the_base_is_shared():
    """seed -> prepare -> train: two seeds give different adapter initialisations, the same seed the same one,
    and methods on the same format share one quantized base."""
    from qbara.models import load_model

    dense, tok = load_model("tiny-llama")
    args = finetune_quality.options(["--model", "tiny-llama", "--rank", "4"])
    prepared = finetune_quality.prepare_method("qlora", dense, tok, args)
    other = finetune_quality.prepare_method("qbara", dense, tok, args)
    assert prepared.quantized is other.quantized

    def init(seed):
        model = finetune_quality.fresh_model(prepared, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, a2 = init(0), init(1), init(0)
    assert a.keys() == b.keys() and a
    assert any(not (a[n] == b[n]).all() for n in a)
    assert all((a[n] == a2[n]).all() for n in a)


def test_paper_setting_on_a_tiny_model(tmp_path):
    """--paper: an lr sweep on the validation split, the chosen lr re-run per seed, held-out and merged losses,
    dense and base step-0 losses, parameter counts and 2-SD verdicts; two workers' parts combine into one report."""
    import finetune_paper

    common = ["--model", "tiny-llama", "--rank", "4", "--alpha", "1", "--steps", "2", "--lrs", "1e-3", "1e-2",
              "--seeds", "0", "1", "--seq", "16", "--val", "4", "--held-out", "4", "--out", str(tmp_path)]
    finetune_quality.main(["--paper", *common, "--methods", "qlora", "qbara", "--part", "nf"])
    finetune_paper.main([*common, "--methods", "qalora", "qahira", "qahira-authors", "--part", "int"])
    finetune_paper.main(["--combine", str(tmp_path)])
    result = finetune_paper.combine(tmp_path)
    assert set(result["methods"]) == {"qlora", "qbara", "qalora", "qahira", "qahira-authors"}
    assert "pool_in=4, pool_out=8" in result["methods"]["qahira-authors"]["adapter"]
    assert result["setting"]["alpha"] / result["setting"]["rank"] == 0.25
    for method, entry in result["methods"].items():
        assert entry["best_lr"] in (1e-3, 1e-2)
        sweep = [r for r in result["runs"] if r["method"] == method and r["seed"] == finetune_paper.LR_SEED]
        assert len(sweep) == 2 and all("val" in r and "held" not in r for r in sweep)  # the lr seed: never reported
        final = finetune_paper.final_runs(result, method)
        assert sorted(r["seed"] for r in final) == [0, 1] and all("merged" in r for r in final)
    for r in finetune_paper.final_runs(result, "qahira"):
        assert r["merge"] == "fold" and r["merged"] == pytest.approx(r["held"], rel=1e-4)
    assert set(result["bases"]) == {"NF4", "INT4-G32", "INT4 4x8"} and "held" in result["dense"]
    words = {v["verdict"] for v in finetune_paper.verdicts(result)}
    assert words <= {"reproduced", "not reproduced", "inconclusive"}
    text = (tmp_path / "finetune_quality_paper.md").read_text()
    assert "Dense (unquantized) step-0" in text and "Q-BaRA beats QLoRA" in text and "trainable parameters" in text
    assert "%" in text.split("QA-HiRA beats QA-LoRA")[1]
    assert (tmp_path / "finetune_quality_paper.png").stat().st_size > 5000


def test_verdicts_need_a_gap_beyond_two_sd():
    import finetune_paper

    def result(a_vals, b_vals):
        runs = [{"method": "qbara", "lr": 1e-3, "seed": s, "held": v} for s, v in enumerate(a_vals)]
        runs += [{"method": "qlora", "lr": 1e-3, "seed": s, "held": v} for s, v in enumerate(b_vals)]
        methods = {m: {"best_lr": 1e-3, "trainable": 100, "label": m} for m in ("qbara", "qlora")}
        return {"methods": methods, "runs": runs}

    assert finetune_paper.verdicts(result([1.0, 1.01, 0.99], [1.5, 1.51, 1.49]))[0]["verdict"] == "reproduced"
    assert finetune_paper.verdicts(result([1.5, 1.51, 1.49], [1.0, 1.01, 0.99]))[0]["verdict"] == "not reproduced"
    assert finetune_paper.verdicts(result([1.0, 1.2, 0.8], [1.05, 1.25, 0.85]))[0]["verdict"] == "inconclusive"


def test_smoke_test_lines_never_say_reproduced_and_give_no_verdict_on_one_seed():
    def result(a_vals, b_vals):
        runs = {m: {"label": m.upper(), "runs": {"t": [{"after": v} for v in vals]}}
                for m, vals in (("qbara", a_vals), ("qlora", b_vals))}
        for m in runs.values():
            for r in m["runs"]["t"]:
                r.update(before=3.0, merged=r["after"], step_s=1.0)
        return {"methods": runs, "data": {"t": {}}, "steps": 10, "lr": 1e-3}

    def line(a_vals, b_vals):
        (text,) = [x for x in finetune_quality.findings(result(a_vals, b_vals)) if "Q-BaRA beats QLoRA" in x]
        assert "reproduced" not in text.lower()
        return text

    assert "one seed: no verdict (QBARA 1.0000 vs QLORA 2.0000, difference +1.0000)" in line([1.0], [2.0])
    assert "QBARA lower than QLORA beyond 2x the seed spread" in line([1.0, 1.01, 0.99], [1.5, 1.51, 1.49])
    assert "QLORA lower than QBARA" in line([1.5, 1.51, 1.49], [1.0, 1.01, 0.99])
    assert "within noise" in line([1.0, 1.2, 0.8], [1.05, 1.25, 0.85])


@pytest.mark.parametrize("method,into", [("qlora", "requantized"), ("qalora", "quantized")])
def test_a_run_and_its_merge_leave_the_shared_base_unchanged(method, into):
    """fresh_model shares the frozen base's tensors with every run instead of copying them: training and merging
    one run must not change them (the base's state before and after, compared value for value)."""
    import warnings

    from qbara import merge
    from qbara.models import load_model

    dense, tok = load_model("tiny-llama")
    args = finetune_quality.options(["--model", "tiny-llama", "--rank", "4"])
    prepared = finetune_quality.prepare_method(method, dense, tok, args)
    before = {k: v.clone() for k, v in prepared.quantized.state_dict().items()}
    model = finetune_quality.fresh_model(prepared, 0)
    train = [finetune_quality.Example(list(range(5, 21)), list(range(5, 21)))] * 4
    finetune_quality.train_steps(model, train, 3, 2, 1e-2, 0, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(model, into=into)
    after = prepared.quantized.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
