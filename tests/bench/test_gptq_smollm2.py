"""The GPTQ benchmark on the tiny model: RTN and GPTQ rows per format, LQ rows only from a run of the same model."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gptq_smollm2  # noqa: E402


def test_tiny_run_writes_rows_and_reads_lq_rows_of_the_same_model_only(tmp_path):
    lq = tmp_path / "lq.json"
    lq.write_text(json.dumps({"model": "tiny-llama", "dense_ppl": 1.0, "window": 512, "rows": [
        {"method": "LQ-LoRA r64 @3.0", "kind": "lq", "fisher": False, "bits_per_param": 3.0, "ppl": 2.0}]}))
    args = gptq_smollm2.options(["--model", "tiny-llama", "--formats", "int3:32", "--samples", "4", "--length",
                                 "32", "--ppl-tokens", "512", "--window", "128", "--dense", "--lq", str(lq),
                                 "--out", str(tmp_path / "out")])
    result = gptq_smollm2.run(args)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"RTN int3-g32", "GPTQ int3-g32"}
    assert rows["GPTQ int3-g32"]["bits_per_param"] == rows["RTN int3-g32"]["bits_per_param"] == 4.0
    assert 0 < rows["GPTQ int3-g32"]["output_error_vs_rtn"] < 1
    assert [r["method"] for r in result["lq_rows"]] == ["LQ-LoRA r64 @3.0"]
    assert result["dense_ppl"] != 1.0  # measured (--dense), not the LQ file's
    for name in ("gptq_quality.json", "gptq_quality.md", "gptq_quality.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "LQ-LoRA r64 @3.0 †" in (tmp_path / "out" / "gptq_quality.md").read_text()
    other = gptq_smollm2.read_lq(lq, "smollm2-135m")
    assert other == ([], {})
