"""Prompted as trained (issue 27): a fine-tune on instruction records records its chat template in the adapter
folder, and merge (dense and native quantized), export --format hf and export --format gguf write it as the
model's chat template, so the prompt transformers (or llama.cpp, from the GGUF's tokenizer.chat_template) builds
for a record is the training prompt token for token; eval --task loss renders with it."""
import json

import pytest
from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer

from qbara.cli import main
from qbara.errors import QbaraError
from qbara.eval.loss import masked_loss
from qbara.models.tiny import CHATML_TEMPLATE
from qbara.pretrained import from_pretrained
from qbara.prompt_formats import NAMED
from qbara.train.config import build_config
from qbara.train.data import IGNORE_INDEX, build_examples, read_records
from qbara.train.trainer import load_datasets, train

RECORDS = [{"instruction": "Add 2 and 3.", "output": "5"},
           {"system": "You translate.", "instruction": "Translate.", "input": "bonjour", "output": "hello"},
           {"instruction": "Name a colour.", "input": "", "output": "blue"},
           {"instruction": "Say hi.", "output": "hi"}]


def _messages(record: dict) -> list[dict]:
    """The prompt messages of an instruction record, as a chat user would type them."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
        [{"role": "user", "content": user}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few QA-HiRA steps on tiny-llama (whose tokenizer's own template is ChatML) with data.template alpaca."""
    root = tmp_path_factory.mktemp("tpl")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = build_config({
        "model": "tiny-llama", "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "qahira", "rank": 4, "alpha": 8},
        "data": {"train": str(data), "template": "alpaca", "max_length": 256},
        "train": {"output_dir": str(root / "out"), "steps": 2, "batch_size": 2, "lr": 1e-3, "save_steps": 1,
                  "logging_steps": 1, "progress": False}})
    result = train(config)
    _, tokenizer = from_pretrained("tiny-llama")
    train_set, _ = load_datasets(config, tokenizer)
    return dict(root=root, data=data, adapter=result.adapter_dir, examples=train_set.examples, tokenizer=tokenizer)


def _prompt_length(example) -> int:
    """Where the training example starts learning (its prompt's length)."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def _check_prompts(run, prompt_ids):
    """prompt_ids(messages) -> ids: equal to each training example's prompt, token for token."""
    for record, example in zip(RECORDS, run["examples"]):
        n = _prompt_length(example)
        assert list(prompt_ids(_messages(record))) == example.input_ids[:n], record


def test_the_adapter_folders_record_the_template(run):
    assert (run["adapter"] / "chat_template.jinja").read_text() == NAMED["alpaca"]
    checkpoints = sorted((run["adapter"].parent).glob("checkpoint-*"))
    assert checkpoints and all((c / "chat_template.jinja").read_text() == NAMED["alpaca"] for c in checkpoints)
    model, tokenizer = from_pretrained("tiny-llama", adapter=str(run["adapter"]))
    assert tokenizer.chat_template == NAMED["alpaca"]
    assert run["tokenizer"].chat_template == CHATML_TEMPLATE  # the base keeps its own


def test_the_training_prompt_is_not_the_base_templates(run):
    """The check below can fail: the base tokenizer's own (ChatML) prompt differs from the training one."""
    record, example = RECORDS[0], run["examples"][0]
    chatml = run["tokenizer"].apply_chat_template(_messages(record), add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    assert list(chatml) != example.input_ids[:_prompt_length(example)]


@pytest.mark.parametrize("command", [["merge", "--into", "dense"], ["merge", "--into", "quantized"],
                                     ["export", "--format", "hf"]], ids=["merge-dense", "merge-native", "export-hf"])
def test_merged_and_hf_folders_prompt_as_trained(run, command, tmp_path):
    out = tmp_path / "model"
    assert main([*command, "--model", "tiny-llama", "--adapter", str(run["adapter"]), "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == NAMED["alpaca"]
    _check_prompts(run, lambda messages: tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    if "quantized" in command:  # qbara's own loader of the native folder too
        _, loaded = from_pretrained(str(out))
        assert loaded.chat_template == NAMED["alpaca"]


def test_gguf_carries_the_template(run, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", "tiny-llama", "--adapter", str(run["adapter"]),
                 "--out", str(out)]) == 0
    field = GGUFReader(str(out)).fields["tokenizer.chat_template"]
    text = field.contents()
    assert text == NAMED["alpaca"]
    # rendered as llama.cpp's Jinja engine does (jinja2's sandbox with trim_blocks / lstrip_blocks), the special
    # tokens as the GGUF names them
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)
    tokenizer = run["tokenizer"]
    _check_prompts(run, lambda messages: tokenizer(template.render(
        messages=messages, add_generation_prompt=True, eos_token=tokenizer.eos_token), add_special_tokens=False
    ).input_ids)


def test_eval_loss_renders_with_the_recorded_template(run, capsys):
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(run["adapter"]), "--task", "loss", "--data",
                 str(run["data"]), "--json"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    model, tokenizer = from_pretrained("tiny-llama", adapter=str(run["adapter"]))
    model.eval()
    records = read_records(str(run["data"]))
    for name in ("alpaca", "chatml"):
        examples = build_examples(records, tokenizer, "instruction", 512, template=name)
        assert (masked_loss(model, examples, progress=False)["loss"] == pytest.approx(loss, rel=1e-6)) == \
            (name == "alpaca")


def test_an_adapter_without_a_template_keeps_the_base_one_and_a_broken_one_is_refused(run, tmp_path):
    import shutil

    older = tmp_path / "older"
    shutil.copytree(run["adapter"], older)
    (older / "chat_template.jinja").unlink()
    _, tokenizer = from_pretrained("tiny-llama", adapter=str(older))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    (older / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(QbaraError, match=r"chat_template.jinja.*TemplateSyntaxError") as err:
        from_pretrained("tiny-llama", adapter=str(older))
    assert "\n" not in str(err.value)


def test_resuming_with_another_template_is_refused(run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run["adapter"].parent, out)
    config = {"model": "tiny-llama", "quant": {"format": "int4", "block_size": 32},
              "adapter": {"method": "qahira", "rank": 4, "alpha": 8},
              "data": {"train": str(run["data"]), "template": "chatml", "max_length": 256},
              "train": {"output_dir": str(out), "steps": 3, "batch_size": 2, "save_steps": 1, "progress": False}}
    with pytest.raises(QbaraError, match="another chat template.*original data.template"):
        train(build_config(config), resume=True)
    config["data"]["template"] = "alpaca"
    assert train(build_config(config), resume=True).final_loss is not None  # the run's own template resumes


def test_a_tokenizer_copied_from_a_gguf_takes_the_models_template(tmp_path):
    """The SmolLM2 path (tokenizer.* copied from the shipped GGUF) and tokenizer_gguf=: the chat template written
    is the tokenizer's (the recorded one), not the copied file's."""
    from qbara.export import export_gguf
    from tests.export.conftest import tiny_adapted
    from tests.export.test_gguf import _source_gguf

    model, tokenizer = tiny_adapted()
    source = _source_gguf(tmp_path / "source.gguf", tokenizer)
    assert GGUFReader(str(source)).fields["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    tokenizer.chat_template = NAMED["gemma"]
    out = tmp_path / "m.gguf"
    assert export_gguf(model, tokenizer, out, tokenizer_gguf=source).tokenizer_source == "copied from source.gguf"
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == NAMED["gemma"]
    assert list(fields["tokenizer.ggml.tokens"].contents()) == list(
        GGUFReader(str(source)).fields["tokenizer.ggml.tokens"].contents())  # the rest is still the copy
