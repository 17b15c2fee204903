"""The loss plot: a title naming method, model and quant, and the eval curve's step-0 point."""
import json

import pytest

from qbara.eval.loss import masked_loss
from qbara.models import load_model
from qbara.quant.config import QuantConfig
from qbara.train import trainer as trainer_module
from qbara.train.config import build_config
from qbara.train.data import build_examples, read_records
from qbara.train.trainer import prepare_for_training, train, training_arguments


def _write(path, pairs):
    path.write_text("\n".join(json.dumps({"instruction": f"Add {a} and {b}.", "output": str(a + b)})
                              for a, b in pairs))
    return str(path)


def _config(tmp_path, steps=4, out="out"):
    return build_config({
        "model": "tiny-llama", "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "qahira", "rank": 4, "alpha": 8},
        "data": {"train": _write(tmp_path / "train.jsonl", [(a, 2 * a % 17) for a in range(24)]),
                 "eval": _write(tmp_path / "eval.jsonl", [(a, a + 3) for a in range(4)]), "max_length": 256},
        "train": {"output_dir": str(tmp_path / out), "steps": steps, "batch_size": 4, "lr": 3e-3, "save_steps": 2,
                  "logging_steps": 1, "eval_steps": 2, "progress": False},
    })


@pytest.fixture
def figures(monkeypatch):
    """(title, eval curve x values) of each loss plot written."""
    seen = []

    def capture(fig, path):
        ax = fig.axes[0]
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        seen.append((ax.get_title(), lines.get("eval loss")))
        return original(fig, path)

    original = trainer_module.save_figure
    monkeypatch.setattr(trainer_module, "save_figure", capture)
    return seen


def test_eval_before_the_first_step_is_the_prepared_models_loss(tmp_path, figures):
    config = _config(tmp_path)
    result = train(config)
    evals = [h for h in result.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    # Reference: qbara's own masked loss of the model as prepared (zero-initialised adapter, same seed) on the
    # eval records (one batch, so HF's batch mean is the token mean).
    model, tokenizer = load_model("tiny-llama", quant=config.quant_config())
    prepared = prepare_for_training(config, model, tokenizer)
    examples = build_examples(read_records(config.data.eval), tokenizer, "instruction", 256)
    assert evals[0]["eval_loss"] == pytest.approx(masked_loss(prepared, examples)["loss"], rel=1e-5)
    assert (result.output_dir / "loss_curve.png").stat().st_size > 1000
    label = QuantConfig("int4", 32).label
    assert figures == [(f"qahira r4 on tiny-llama ({label})", [0, 2, 4])]


def test_a_resumed_run_does_not_evaluate_at_its_start_again(tmp_path, figures):
    train(_config(tmp_path, steps=2))
    result = train(_config(tmp_path, steps=4), resume=True)
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [0, 2, 4]
    assert training_arguments(_config(tmp_path), has_eval=True, resume=True).eval_on_start is False
    assert training_arguments(_config(tmp_path), has_eval=False).eval_on_start is False
