import re

import pytest
import torch

from qbara.errors import QbaraError
from qbara.train.config import ALIASES, OPTIMIZERS, build_config, load_run_config
from qbara.train.trainer import training_arguments


def test_yaml_values_and_overrides_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ntrain: {lr: 1e-4, steps: 5}\nquant: {format: int4}\n")
    config = load_run_config(str(path), {"adapter.method": "qahira", "batch_size": "3"})
    assert config.model.name == "tiny-llama"
    assert config.train.lr == 1e-4 and config.train.steps == 5 and config.train.batch_size == 3
    assert config.quant_config().block_size == 32  # INT default group
    assert config.adapter_config().method == "qahira"


@pytest.mark.parametrize("overrides,message", [
    ({"train.lrr": 1}, "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ({"batchsize": 1}, "did you mean 'batch_size'"),
    ({"train.steps": "many"}, "train.steps: 'many' is not a valid int"),
    ({"adapter.method": "lorra"}, "did you mean 'lora'"),
    ({"data.format": "xml"}, "data.format 'xml'"),
    ({"learning_rat": 1}, "unknown config key 'learning_rat'; did you mean 'learning_rate' (= train.lr)?"),
    ({"train.learning_rat": 1}, "did you mean 'learning_rate' (= train.lr)?"),
    ({"max_grad_nrm": 1}, "unknown config key 'max_grad_nrm'; did you mean 'max_grad_norm'?"),
    ({"lora_rnk": 4}, "did you mean 'lora_rank' (= adapter.rank)?"),
    ({"format": "nf4"}, "config key 'format' is ambiguous: write data.format or quant.format"),
    ({"optim": "adamw_bnb_8bit"}, "train.optim 'adamw_bnb_8bit': choose adamw_torch, adamw_torch_fused, adafactor, "),
    ({"warmup_ratio": 1}, "train.warmup_ratio must be in [0, 1), got 1.0"),
    ({"max_grad_norm": -1}, "train.max_grad_norm must be >= 0"),
    ({"max_steps": -1}, "train.steps must be positive (or set train.epochs), got -1"),
    ({"num_train_epochs": -1}, "train.epochs must be positive (or 0 to train for train.steps), got -1.0"),
])
def test_bad_keys_and_values_get_one_clear_message(overrides, message):
    with pytest.raises(QbaraError, match=re.escape(message)):
        build_config({}, overrides)


# A valid value for each field an alias names (a new alias needs its field here).
ALIAS_VALUES = {"train.lr": 1e-4, "train.epochs": 2.0, "train.steps": 7, "train.batch_size": 3, "train.grad_accum": 2,
                "train.scheduler": "cosine", "adapter.rank": 4, "adapter.alpha": 32.0, "adapter.dropout": 0.1,
                "model.name": "tiny-llama", "data.max_length": 64, "train.overwrite": True, "quant.format": "nf4",
                "quant.double_quant": False, "model.adapter": "runs/old/adapter", "adapter.target_modules": ["q_proj"],
                "data.held_out": 0.1, "data.template": "chatml", "train.optim": "adafactor", "adapter.method": "qbara",
                "data.max_records": 5}


def _field(config, key):
    section, name = key.split(".")
    part = getattr(config, section)
    return part[name] if isinstance(part, dict) else getattr(part, name)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_sets_its_field_in_yaml_and_overrides(alias):
    target = ALIASES[alias]
    section, value = target.split(".")[0], ALIAS_VALUES[target]
    for data, overrides in [({section: {alias: value}}, {}),  # under its section in YAML
                            ({alias: value}, {}),             # flat top-level YAML key
                            ({}, {alias: value}),             # --learning_rate 1e-4
                            ({}, {f"{section}.{alias}": value})]:  # --train.learning_rate 1e-4
        assert _field(build_config(data, overrides), target) == value, (data, overrides)


def test_flat_hf_style_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base_model: tiny-llama\nsequence_len: 128\nlora_r: 4\nlora_alpha: 8\ntarget_modules: [q_proj]\n"
                    "learning_rate: 1e-4\nnum_train_epochs: 3\nmax_steps: -1\nwarmup_ratio: 0.1\nweight_decay: 0.01\n"
                    "max_grad_norm: 0.3\noptim: adafactor\nsave_total_limit: 1\nlogging_steps: 2\neval_steps: 4\n"
                    "save_steps: 8\nseed: 3\noutput_dir: out\nbf16: true\ngradient_checkpointing: true\n"
                    "data: {train: t.jsonl}\n")
    config = load_run_config(str(path), {"learning_rate": 5e-4})  # an override wins over the YAML
    t = config.train
    assert (config.model.name, config.data.max_length, config.data.train) == ("tiny-llama", 128, "t.jsonl")
    assert config.adapter_config().rank == 4 and config.adapter_config().target_modules == ("q_proj",)
    assert (t.lr, t.epochs, t.steps, t.warmup_ratio, t.weight_decay, t.max_grad_norm, t.optim) == \
        (5e-4, 3.0, -1, 0.1, 0.01, 0.3, "adafactor")
    got = (t.save_total_limit, t.logging_steps, t.eval_steps, t.save_steps, t.seed, t.output_dir)
    assert got == (1, 2, 4, 8, 3, "out")
    assert t.bf16 and t.gradient_checkpointing


@pytest.mark.parametrize("data,overrides,message", [
    ({"train": {"lr": 1, "learning_rate": 2}}, {}, "config keys 'train.lr' and 'train.learning_rate' both set train.lr"),
    ({"learning_rate": 1, "train": {"lr": 2}}, {}, "config keys 'learning_rate' and 'train.lr' both set train.lr"),
    ({"model": "a", "base_model": "b"}, {}, "config keys 'model.name' and 'base_model' both set model.name"),
    ({}, {"r": 4, "adapter.lora_r": 8}, "config keys 'r' and 'adapter.lora_r' both set adapter.rank"),
    ({}, {"max_seq_length": 1, "cutoff_len": 2}, "config keys 'max_seq_length' and 'cutoff_len' both set data.max_length"),
    ({"train": {"steps": 5}}, {"num_train_epochs": 2}, "train.steps=5 and train.epochs=2.0 (max_steps and "
                                                       "num_train_epochs) both set the run length: keep one"),
    ({}, {"steps": 100, "epochs": 1}, "train.steps=100 and train.epochs=1.0"),
    ({"warmup_steps": 3, "warmup_ratio": 0.1}, {}, "train.warmup_steps=3 and train.warmup_ratio=0.1 both set the warmup"),
])
def test_two_keys_for_one_setting_are_refused(data, overrides, message):
    with pytest.raises(QbaraError, match=re.escape(message)):
        build_config(data, overrides)


def test_new_fields_reach_training_arguments(tmp_path):
    out = str(tmp_path / "out")
    default = training_arguments(build_config({}, {"output_dir": out}), has_eval=False)
    assert (default.max_steps, default.max_grad_norm, default.optim, default.get_warmup_steps(100)) == \
        (100, 1.0, "adamw_torch", 0)
    config = build_config({"train": {"num_train_epochs": 2.5, "max_grad_norm": 0.3, "warmup_ratio": 0.1,
                                     "optim": "sgd", "output_dir": out}})
    args = training_arguments(config, has_eval=False)
    assert (args.num_train_epochs, args.max_steps, args.max_grad_norm, args.optim) == (2.5, -1, 0.3, "sgd")
    assert getattr(args, "warmup_ratio", args.warmup_steps) == 0.1 and args.get_warmup_steps(100) == 10


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_supported_optimizers_step_on_cpu(optim, tmp_path):
    from transformers import Trainer

    args = training_arguments(build_config({}, {"optim": optim, "output_dir": str(tmp_path)}), has_eval=False)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    layer = torch.nn.Linear(4, 4)
    optimizer = cls(layer.parameters(), **kwargs)
    before = layer.weight.detach().clone()
    layer(torch.randn(2, 4)).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(before, layer.weight)


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(QbaraError, match="unknown config section 'trian'; did you mean 'train'"):
        build_config({"trian": {"lr": 1}})
    with pytest.raises(QbaraError, match="config file .* not found"):
        load_run_config(str(tmp_path / "nope.yaml"))
