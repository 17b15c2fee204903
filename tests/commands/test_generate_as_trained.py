"""`qbara generate --adapter` prompts as the fine-tune was trained (issue 27): the adapter folder's recorded
template (data.template alpaca here, over tiny-llama's own ChatML) renders the prompts of the training file token
for token as training rendered them. Uses the training run of the exported-template tests."""
import json

import pytest

pytest.importorskip("qbara.prompt_formats")  # data.template
from qbara.cli import main  # noqa: E402
from qbara.commands import generate as command  # noqa: E402
from tests.export.test_exported_template import RECORDS, _prompt_length, run  # noqa: E402, F401 - run: a fixture


def test_generate_prompts_the_training_file_as_trained(run, monkeypatch, capsys):  # noqa: F811 - the fixture
    rendered = []

    def spy(tokenizer, prompt, template):
        rendered.append(command_prompt_ids(tokenizer, prompt, template))
        return rendered[-1]

    command_prompt_ids = command.prompt_ids
    monkeypatch.setattr(command, "prompt_ids", spy)
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-llama", "--adapter", str(run["adapter"]), "--file", str(run["data"]),
                 "--temperature", "0", "--max-new-tokens", "4", "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(RECORDS) == len(rendered)
    for ids, example in zip(rendered, run["examples"]):
        assert ids == example.input_ids[:_prompt_length(example)]
