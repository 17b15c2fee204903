"""The calibration study's own logic on fake runs: size tokens, draws, BOS windows, which llama.cpp files each
qbara file is paired with, the paired numbers against a hand computation, the report, and the chunked NLL."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gguf_calibration as gc  # noqa: E402

import gguf_llamacpp  # noqa: E402


def test_size_tokens_and_draw_labels():
    assert gc.parse_size("Q2_K") == ("Q2_K", True)
    assert gc.parse_size("IQ4_NL-plain") == ("IQ4_NL", False)
    assert gc.draw_label("shakespeare", 1) == "shakespeare"
    assert gc.draw_label("mixed", 2) == "mixed-d2"
    assert gc.base_calibration("mixed-d2") == "mixed" and gc.base_calibration("gsm8k") == "gsm8k"
    assert set(gc.DRAW_PLAYS[1]).isdisjoint(gc.DRAW_PLAYS[2]) and "twelfth_night" not in sum(gc.DRAW_PLAYS.values(), ())


def test_second_draw_shuffles_the_calibration_questions_only(tmp_path):
    questions = [f"q{i}" for i in range(50)]
    read = [[json.loads(line)["text"] for line in gc.gsm8k_calibration_file(tmp_path, questions, d).read_text()
             .splitlines()] for d in (1, 2)]
    assert read[0] == questions
    assert sorted(read[1]) == sorted(questions) and read[1] != questions


class CharTokenizer:
    """One token per character, BOS = 1 when `bos`."""

    def __init__(self, bos: bool):
        self.bos_token_id = 1 if bos else None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) % 200 + 2 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id else []) + ids}


def test_held_out_windows_start_with_bos_only_for_a_bos_tokenizer():
    from qbara.data import shakespeare_text

    text = shakespeare_text("twelfth_night")
    for bos in (False, True):
        tok = CharTokenizer(bos)
        first = gc.bos_of(tok)
        assert first == (1 if bos else None)
        windows = gc.held_out_windows(tok, ["a question?"] * 40, 64, 5, first)
        assert [len(w) for w in windows["twelfth_night"]] == [64] * 5
        body = [w[1:] if bos else w for w in windows["twelfth_night"]]
        assert all(w[0] == 1 for w in windows["twelfth_night"]) == bos
        assert sum(body, []) == tok(text, add_special_tokens=False)["input_ids"][:len(body) * len(body[0])]


def _row(kind, tensor_bytes, nlls, **extra):
    return {"kind": kind, "tensor_bytes": tensor_bytes, "bits": 8 * tensor_bytes / 1000, "types": {},
            "window_nlls": {"twelfth_night": list(nlls[0]), "gsm8k": list(nlls[1])}, **extra}


def fake_rows():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.3, (2, 12))
    return {
        "stock/IQ4_NL": _row("stock", 1000, base + 0.05),
        "stock/IQ4_XS": _row("stock", 990, base + 0.02),
        "stock/Q4_K_M": _row("stock", 1100, base - 0.5),  # larger than the qbara file: never paired
        "stock/IQ4_XS+imatrix/shakespeare": _row("stock", 990, base + 0.01, imatrix=True, calibration="shakespeare"),
        "stock/IQ4_XS+imatrix/mixed": _row("stock", 990, base - 0.4, imatrix=True, calibration="mixed"),
        # a few bytes under its budget (the matched IQ4_NL's), as the ILP leaves it: IQ4_NL is still paired
        "IQ4_NL-plain/shakespeare/qbara-fisher": _row("qbara", 996, base + rng.normal(0, 0.01, (2, 12)),
                                                      costs="fisher", calibration="shakespeare",
                                                      preset_tensor_bytes=1000),
    }


def test_each_qbara_file_is_paired_with_the_llamacpp_files_at_or_below_its_size_of_its_calibration():
    rows = fake_rows()
    refs = gc.references(rows, "IQ4_NL-plain/shakespeare/qbara-fisher")
    assert sorted(refs) == ["stock/IQ4_NL", "stock/IQ4_XS", "stock/IQ4_XS+imatrix/shakespeare"]
    pairs = gc.comparisons(rows)
    assert len(pairs) == 3 * 2
    for p in pairs:  # against a hand computation of the paired mean and standard error
        d = np.subtract(rows[p["a"]]["window_nlls"][p["domain"]], rows[p["b"]]["window_nlls"][p["domain"]])
        se = math.sqrt(sum((x - d.mean()) ** 2 for x in d) / (len(d) - 1) / len(d))
        assert math.isclose(p["mean_diff"], d.mean(), abs_tol=1e-12) and math.isclose(p["se"], se, rel_tol=1e-9)
        assert p["in_domain"] == (p["domain"] == "twelfth_night")
    best = gc.best_references(rows, pairs)
    assert {(p["domain"], p["b"]) for p in best} == {("twelfth_night", "stock/IQ4_XS+imatrix/shakespeare"),
                                                     ("gsm8k", "stock/IQ4_XS+imatrix/shakespeare")}


def test_report_writes_the_tables_json_and_plot(tmp_path):
    rows = fake_rows()
    setting = {"model": "fake", "samples": 4, "length": 8, "windows": 12, "window": 16, "bos": 1,
               "missing": ["stock/Q2_K"]}
    gc.write_report(rows, setting, tmp_path)
    md = (tmp_path / "gguf_calibration.md").read_text()
    assert "| IQ4_NL-plain/shakespeare/qbara-fisher | twelfth_night | stock/IQ4_XS+imatrix/shakespeare |" in md
    assert "Not measured yet (1 files" in md and "starts with BOS" in md
    data = json.loads((tmp_path / "gguf_calibration.json").read_text())
    assert len(data["comparisons"]) == 6 and len(data["best"]) == 2
    assert (tmp_path / "gguf_calibration.png").stat().st_size > 0


def test_chunked_nll_is_the_cross_entropy_of_the_next_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (37, 50)).astype(np.float32)
    ids = rng.integers(0, 50, 37).tolist()
    reference = torch.nn.functional.cross_entropy(torch.tensor(logits[:-1], dtype=torch.float64),
                                                  torch.tensor(ids[1:])).item()
    for rows in (1, 5, 64):
        assert math.isclose(gguf_llamacpp.nll(logits, ids, rows=rows), reference, rel_tol=1e-12)
