"""`qbara demo` (the README's main command) end to end on the tiny model: it trains, folds into INT4 and
reports a merged loss that matches the adapter's within what the fp16 minima lost."""
import json

import pytest

from qbara.cli import main


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def test_demo_trains_folds_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny-llama", "--steps", "2", "--batch-size", "2", "--held-out", "4",
            "--max-length", "1024", "--lr", "1e-2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_out_loss_after"] != report["held_out_loss_before"]
    assert 0 <= report["fold_rounding"] < 0.05
    assert report["held_out_loss_merged"] == pytest.approx(report["held_out_loss_after"], rel=1e-3)
    assert (out / "merged-int4").is_dir() and "fp16 minima lost" in capsys.readouterr().out
    # the merged folder prompts as the adapter was trained (issue 27: data.template recorded and carried over)
    from transformers import AutoTokenizer

    recorded = (out / "train" / "adapter" / "chat_template.jinja").read_text()
    assert AutoTokenizer.from_pretrained(out / "merged-int4").chat_template == recorded
    assert main(args) == 0  # running it again into the same folder works (README: run twice)
