"""bench/finetune_equal_bits.py: its method names parse (and bad ones are refused), a verdict needs the paired
per-seed difference beyond 2 SD, its parts have finetune_paper's setting (a stored paper-setting part is resumed,
another setting refused), GPTQ-LoRA starts at its GPTQ base, an LQ-style model's runs share its frozen tensors,
and a rerun resumes instead of recomputing."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import finetune_equal_bits as eb  # noqa: E402

from qbara.models import load_model  # noqa: E402

import finetune_paper as fp  # noqa: E402
import finetune_quality as fq  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def test_method_names_parse_and_bad_ones_are_refused():
    assert eb.method_kind("lq-fisher-2.75") == ("lq", 2.75)
    kind, config = eb.method_kind("gptq-int3-g64")
    assert kind == "gptq" and config.block_size == 64 and config.label == "int3-g64"
    assert eb.method_kind("qlora") == ("qlora", None)
    for bad in ("lq-fisher-x", "gptq-int4", "lora"):
        with pytest.raises(SystemExit, match="unknown method"):
            eb.method_kind(bad)


def fake_result(held: dict) -> dict:
    """{method: {seed: held-out loss}} as final runs at each method's chosen lr."""
    runs = [{"method": m, "lr": 1e-3, "seed": s, "held": h, "val": h, "phase": "final"}
            for m, per in held.items() for s, h in per.items()]
    return {"setting": {"seeds": [0, 1, 2], "lr_seed": 1000}, "runs": runs,
            "methods": {m: {"best_lr": 1e-3, "label": m} for m in held}}


def test_verdict_needs_the_paired_difference_beyond_two_sd():
    # the seeds differ by much more than the methods do, but every seed favours the LQ method by ~0.05: paired, that
    # is a verdict although the unpaired SDs (~0.1) would call it inconclusive
    base = {0: 4.4, 1: 4.5, 2: 4.6}
    result = fake_result({"lq-fisher-3.0": {s: h - 0.05 + e for (s, h), e in zip(base.items(), (0.001, -0.001, 0))},
                          "qlora": base, "gptq-int4-g32": {s: h + (0.02, -0.02, 0.01)[s] for s, h in base.items()}})
    c = eb.paired(result, "lq-fisher-3.0", "qlora")
    assert c["verdict"] == "lower" and c["seeds"] == [0, 1, 2] and abs(c["mean_diff"] + 0.05) < 1e-12
    assert eb.paired(result, "gptq-int4-g32", "qlora")["verdict"] == "inconclusive"  # +0.02, -0.02, +0.01
    pairs = {(c["a"], c["b"]) for c in eb.comparisons(result)}
    assert pairs == {("lq-fisher-3.0", "qlora"), ("lq-fisher-3.0", "gptq-int4-g32"), ("gptq-int4-g32", "qlora")}
    one = fake_result({"lq-fisher-3.0": {0: 4.0}, "qlora": {0: 4.5}})
    assert eb.paired(one, "lq-fisher-3.0", "qlora")["verdict"] == "inconclusive (one seed)"
    assert eb.paired(fake_result({"a": {0: 4.0}, "b": {1: 4.0}}), "a", "b") is None  # no common seed


def test_parts_have_the_paper_setting_so_a_stored_paper_part_resumes():
    args = eb.options(["--out", "x"])
    a = eb.paper_args(args, "qlora", None)
    stored = {"setting": {k: getattr(a, k) for k in fp.SAME_SETTING}, "data": {"val": 32, "held_out": 48}}
    stored["setting"].update(model="gemma3-270m", steps=30, lr_seed=1000)
    assert fp.setting_mismatch(stored, a) == []  # the paper setting's qlora part (30 steps, seed 1000) matches
    other = eb.paper_args(eb.options(["--out", "x", "--steps", "60"]), "qlora", None)
    assert any(d.startswith("steps") for d in fp.setting_mismatch(stored, other))
    assert a.methods == ["qlora"] and a.part == "qlora" and a.no_merge and a.dq_mode == "shared"
    assert a.grow_to is None and eb.paper_args(eb.options(["--out", "x", "--grow-to", "1e-3"]), "qlora",
                                               None).grow_to == 1e-3


def test_gptq_lora_starts_at_its_base_and_lq_runs_share_frozen_tensors():
    dense, tokenizer = load_model("tiny-llama")
    args = eb.paper_args(eb.options(["--out", "x", "--rank", "4"]), "gptq-int4-g32", None)
    p = eb.prepare_method("gptq-int4-g32", dense, tokenizer, args, seed=3)
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    with torch.no_grad():
        assert torch.equal(p.model(input_ids=ids).logits, p.quantized(input_ids=ids).logits)  # LoRA B = 0
        assert not torch.equal(p.model(input_ids=ids).logits, dense(input_ids=ids).logits)
    trainable = {n for n, t in p.model.named_parameters() if t.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert eb.BITS["gptq-int4-g32"]["q"] == eb.BITS["gptq-int4-g32"]["total_step0"] == 5.0
    # an adapter-less (LQ-style) prepared model: each run's copy shares the frozen tensors, owns the trainable ones
    prepared = fq.Prepared(p.model, "x", "x", 0.0)
    run = fp.fresh_model(prepared, 0)
    for (name, a), b in zip(p.model.named_parameters(), run.parameters()):
        assert (a is b) == (not a.requires_grad), name
        assert torch.equal(a, b)


def test_rerun_resumes_without_new_runs(tmp_path, capsys):
    argv = ["--model", "tiny-llama", "--methods", "qlora", "--lrs", "1e-3", "2e-3", "--seeds", "0", "1",
            "--steps", "1", "--rank", "4", "--out", str(tmp_path)]
    eb.main(argv)
    part = json.loads((tmp_path / "finetune_quality_paper.qlora.json").read_text())
    assert len(part["runs"]) == 4 and part["methods"]["qlora"]["bits"]["q"] > 4.0  # 2 sweep + 2 seeds
    first = (tmp_path / "equal_bits.json").read_text()
    capsys.readouterr()
    eb.main(argv)
    assert "seed 1000: val" not in capsys.readouterr().out  # no sweep run again
    again = json.loads((tmp_path / "equal_bits.json").read_text())
    assert [r["held"] for r in again["runs"] if "held" in r] == \
        [r["held"] for r in json.loads(first)["runs"] if "held" in r]
    assert (tmp_path / "equal_bits.md").read_text().count("| QLoRA r4 |") == 1


def test_options_refuse_a_bad_method():
    with pytest.raises(SystemExit):
        eb.options(["--out", "x", "--methods", "nf4"])
    assert isinstance(eb.options(["--out", "x"]), argparse.Namespace)


def test_bits_of_a_part_without_them(tmp_path):
    step0 = tmp_path / "step0.json"
    step0.write_text(json.dumps({"rows": {"LQ-LoRA+Fisher r64 @3.0": {"q_bits": 3.0, "total_bits": 4.231}}}))
    assert eb.bits_of("lq-fisher-3.0", 64, step0)["total_step0"] == 4.231
    assert eb.bits_of("lq-fisher-3.0", 8, step0)["total_step0"] != eb.bits_of("lq-fisher-3.0", 8, step0)["q"]  # nan
    assert eb.bits_of("gptq-int4-g32", 64)["q"] == 5.0 and eb.bits_of("gptq-int3-g64", 64)["total_step0"] == 3.5
    assert abs(eb.bits_of("qlora", 64)["q"] - 4.127) < 1e-3


def test_report_of_a_part_stopped_in_its_sweep(tmp_path):
    setting = {"model": "gemma3-270m", "rank": 64, "alpha": 16.0, "dropout": 0.0, "lrs": [2.5e-4, 5e-4],
               "steps": 30, "batch": 2, "seq": 32, "seeds": [0, 1, 2], "lr_seed": 1000, "warmup": 0.03, "clip": 0.3,
               "threads": 1}
    common = {"setting": setting, "data": {"task": "shakespeare (hamlet)", "train": 10, "val": 32, "held_out": 48},
              "dense": {"val": 5.2, "held": 5.4}, "wall_s": 60.0}
    done = dict(common, bases={"NF4": {"val": 5.3, "held": 5.5}},
                methods={"qlora": {"label": "QLoRA r64", "base": "NF4", "trainable": 10, "best_lr": 5e-4}},
                runs=[{"method": "qlora", "lr": 5e-4, "seed": s, "val": 4.2, "held": 4.4 + s / 100, "step_s": 1.0,
                       "phase": "final"} for s in (0, 1, 2)]
                + [{"method": "qlora", "lr": 5e-4, "seed": 1000, "val": 4.2, "phase": "sweep"}])
    stopped = dict(common, bases={"LQ 3.0 (+factors 4.231)": {"val": 5.25, "held": 5.45}},
                   methods={"lq-fisher-3.0": {"label": "LQ-LoRA+Fisher r64 @3.0",
                                              "base": "LQ 3.0 (+factors 4.231)", "trainable": 10}},
                   runs=[{"method": "lq-fisher-3.0", "lr": 2.5e-4, "seed": 1000, "val": 4.1, "phase": "sweep"}])
    for name, part in (("qlora", done), ("lq-fisher-3.0", stopped)):
        (tmp_path / f"finetune_quality_paper.{name}.json").write_text(json.dumps(part))
    result = eb.report(tmp_path)
    md = (tmp_path / "equal_bits.md").read_text()
    assert "| LQ-LoRA+Fisher r64 @3.0 | nan | nan | 10 | 0.00025 | 5.4500 | no reported seed yet |" in md
    assert "4.4100 ± 0.0100 (n=3)" in md and eb.comparisons(result) == []  # the LQ part has no chosen lr yet
    assert result["wall_s"] == 120.0 and (tmp_path / "equal_bits.png").exists()


def test_lq_model_scores_the_same_with_its_base_dequantized_once():
    """finetune_paper evaluates and trains with every QuantizedLinear swapped for its dequantized nn.Linear; on an
    LQ-LoRA model (the base inside each adapter) that must compute what the model computes."""
    dense, tokenizer = load_model("tiny-llama")
    args = eb.paper_args(eb.options(["--out", "x", "--rank", "4", "--fisher-samples", "2", "--fisher-length", "16"]),
                         "lq-fisher-3.0", None)
    p = eb.prepare_method("lq-fisher-3.0", dense, tokenizer, args)
    assert p.adapter is None and eb.BITS["lq-fisher-3.0"]["total_step0"] > eb.BITS["lq-fisher-3.0"]["q"]
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    with torch.no_grad():
        plain = p.model(input_ids=ids).logits
        with fp.dequantized_once(p.model):
            swapped = p.model(input_ids=ids).logits
    torch.testing.assert_close(swapped, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(plain, dense(input_ids=ids).logits)
