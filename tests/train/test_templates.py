"""Issue #26: chat templates render in a bounded sandbox (qbara.templates): ordinary templates exactly as
transformers renders them; a template that builds huge values or loops for ever is one QbaraError, fast."""
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.models.tiny import CHATML_TEMPLATE
from qbara.templates import ChatTemplate, TemplateLimits
from tests.helpers import run_measured

HUGE_STRING = "{{ 'x' * 10**12 }}"
HUGE_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if tools is not none %}\n"
    "    {{- \"Environment: ipython\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# The language features real templates use: namespace, ~, %, string methods, filters, dict(), macros,
# loop.last, {% generation %}, strftime_now and tools.
FEATURES = (
    "{%- set ns = namespace(turns=0, system='') %}"
    "{%- macro header(role) %}<|{{ role|upper }}|>{% endmacro %}"
    "{%- for m in messages %}{% if m.role == 'system' %}{% set ns.system = ns.system ~ m.content.strip() %}"
    "{% endif %}{% endfor %}"
    "{%- if ns.system %}{{ '[sys:%s]' % ns.system }}{% endif %}"
    "{%- if tools %}{{ tools|map(attribute='name')|join(', ') }}|{{ tools|tojson }}{% endif %}"
    "{%- set d = dict(a=1, b=[1, 2]) %}{{ d|tojson }}{{ strftime_now('%Y')|length }}"
    "{%- for m in messages|rejectattr('role', 'equalto', 'system') %}"
    "{% set ns.turns = ns.turns + 1 %}{{ header(m.role) }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content|replace('  ', ' ') }}{% endgeneration %}"
    "{% else %}{{ '{}: {}'.format(loop.index, m.content) }}{% endif %}"
    "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ '\\n' if not loop.last else loop.length - loop.index }}{% endfor %}"
    "{{ ns.turns * 2 }} {{ 2 ** 10 }} {{ ('<' ~ ns.turns ~ '>')|e }} {{ range(3)|list|length }}"
    " {{ (messages|length) // 2 }} {{ messages[-1].content|wordcount }}"
    "{%- if add_generation_prompt %}{{ header('assistant') }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!  How can I help?"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "add", "tool_calls": None},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
]
TOOLS = [{"name": "add", "description": "Adds", "parameters": {"type": "object", "properties": {}}}]


def _tokenizer(template: str):
    _, tok = tiny_llama()
    tok.chat_template = template
    return tok


def _assert_same_as_transformers(tok, chats, **kwargs):
    template = ChatTemplate.of(tok)
    for messages in chats:
        for prompt in (False, True):
            ours = template.render(messages, add_generation_prompt=prompt, **kwargs)
            theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kwargs)
            assert ours == theirs


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3, MISTRAL, FEATURES],
                         ids=["chatml", "llama3", "mistral", "features"])
def test_ordinary_templates_render_as_transformers(template):
    _assert_same_as_transformers(_tokenizer(template), CHATS)
    _assert_same_as_transformers(_tokenizer(template), CHATS, tools=TOOLS)


def test_gemma_template_renders_as_transformers_and_refuses_as_it_does():
    tok = _tokenizer(GEMMA)
    _assert_same_as_transformers(tok, [CHATS[0], CHATS[1][1:]])
    with pytest.raises(QbaraError, match="System role not supported"):
        ChatTemplate.of(tok).render(CHATS[1])


def test_smollm2_template_renders_as_transformers():
    from transformers import AutoTokenizer

    from qbara.models.embedded import cache_root

    folder = cache_root() / "smollm2-135m-instruct"
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip("SmolLM2's converted folder is not in the cache")
    tok = AutoTokenizer.from_pretrained(str(folder))
    _assert_same_as_transformers(tok, CHATS)
    assert str(folder) in ChatTemplate.of(tok).source


@pytest.mark.parametrize("text, message", [
    (HUGE_STRING, "builds a string of 1,000,000,000,000 characters"),
    (HUGE_LOOP, "runs past its limit of 1,000,000 steps"),
    ("{{ 2 ** 10 ** 10 }}", "builds a number beyond"),
    ("{{ 'x'|center(10**9) }}", "the number 1,000,000,000"),
    ("{{ '{:>9999999999}'.format(1) }}", "builds a formatted string"),
    ("{{ '%9999999999s' % 'x' }}", "builds a formatted string"),
    ("{{ 'ab'.replace('', 'x' * 4000000) }}", "builds a string of"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a string of"),
    ("{{ (['x' * 1000000] * 1000)|join }}", "builds a string of"),
    ("{{ ['x' * 1000000] * 1000 }}", "builds an output of"),
    ("{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
     "runs past its limit of"),
    ("{% for i in range(1000) recursive %}{% if loop.depth < 5 %}{{ loop(range(1000)) }}{% endif %}{% endfor %}",
     "runs past its"),  # its step or its time limit, whichever comes first on a busy machine
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses past Python's depth limit"),
])
def test_hostile_template_is_one_error_fast(text, message):
    start = time.monotonic()
    with pytest.raises(QbaraError, match="the chat template in .*tokenizer_config.json \\(chat_template\\)") as err:
        ChatTemplate.of(_tokenizer(text)).render(CHATS[0])
    assert message in str(err.value) and "limit" in str(err.value)
    assert time.monotonic() - start < 10


def test_limits_are_the_ones_given():
    """The bounds hold at any size: the step budget, the deadline and the size of values."""
    tok = _tokenizer(HUGE_LOOP)
    with pytest.raises(QbaraError, match="limit of 1,000 steps"):
        ChatTemplate.of(tok, TemplateLimits(max_steps=1000)).render(CHATS[0])
    start = time.monotonic()
    with pytest.raises(QbaraError, match="time limit of 0.2 seconds"):
        ChatTemplate.of(tok, TemplateLimits(max_steps=10**12, seconds=0.2)).render(CHATS[0])
    assert time.monotonic() - start < 1
    with pytest.raises(QbaraError, match="builds a string of 101 characters or items \\(the limit is 100\\)"):
        ChatTemplate.of(_tokenizer("{{ 'x' * 101 }}"), TemplateLimits(max_chars=100)).render(CHATS[0])
    with pytest.raises(QbaraError, match="builds a string of 102 characters"):  # stopped while generating
        limited = ChatTemplate.of(_tokenizer("{% for i in range(50) %}abc{% endfor %}"),
                                  TemplateLimits(max_chars=100))
        limited.render(CHATS[0])
    assert ChatTemplate.of(_tokenizer("{% for i in range(30) %}abc{% endfor %}"),
                           TemplateLimits(max_chars=100)).render(CHATS[0]) == "abc" * 30


@pytest.mark.parametrize("text", [HUGE_STRING, HUGE_LOOP])
def test_hostile_template_through_the_data_builder(text):
    from qbara.train.data import build_examples

    records = [{"messages": CHATS[0]}] * 3
    start = time.monotonic()
    with pytest.raises(QbaraError, match="chat template"):
        build_examples(records, _tokenizer(text), "chat", 64, on_error="skip")
    assert time.monotonic() - start < 10


def test_template_compiled_once_for_a_dataset():
    from qbara.templates import _compile
    from qbara.train.data import build_examples

    tok = _tokenizer(CHATML_TEMPLATE + "{# once #}")
    before = _compile.cache_info().misses
    examples = build_examples([{"messages": CHATS[1]}] * 200, tok, "chat", 512)
    assert len(examples) == 200 and _compile.cache_info().misses == before + 1


def test_no_chat_template_is_one_error_and_data_falls_back_to_alpaca():
    """A tokenizer without a chat template: ChatTemplate.of refuses it; data.template auto renders chat records
    with Alpaca instead (issue 27)."""
    from qbara.train.data import build_examples

    _, tok = tiny_llama()
    tok.chat_template = None
    with pytest.raises(QbaraError, match="has no usable chat template"):
        ChatTemplate.of(tok)
    (example,) = build_examples([{"messages": CHATS[0]}], tok, "chat", 512)
    assert tok.decode(example.input_ids).startswith("Below is an instruction that describes a task.")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model, tok = tiny_llama()
    model.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return root


def _with_template(folder: Path, target: Path, text: str) -> Path:
    shutil.copytree(folder, target)
    jinja = target / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(text)
    else:
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["chat_template"] = text
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("text", [HUGE_STRING, HUGE_LOOP], ids=["huge string", "huge loop"])
def test_hostile_template_through_qbara_train(text, hf_folder, tmp_path):
    from tests.test_hardening import ENV, _check_one_line

    model = _with_template(hf_folder, tmp_path / "model", text)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHATS[0]}) + "\n" for _ in range(3)))
    config = {"model": str(model), "quant": {"format": "int4", "block_size": 32},
              "adapter": {"method": "lora", "rank": 4}, "data": {"train": str(data), "format": "chat"},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 1, "batch_size": 1, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    start = time.monotonic()
    rc, _, stderr, peak_kib = run_measured([sys.executable, "-m", "qbara", "train", "--config",
                                            str(tmp_path / "run.yaml")], timeout=120, env=ENV, cwd=tmp_path)
    # bitsandbytes may note on import that its hub kernels cannot be fetched offline: not qbara's output
    ours = "\n".join(line for line in stderr.splitlines() if "kernels" not in line)
    _check_one_line(rc, ours)
    assert ours.startswith("qbara train: error: the chat template in ") and "limit" in ours, stderr
    assert time.monotonic() - start < 60  # the process start (torch, transformers) dominates
    assert peak_kib < 3 << 20, f"{peak_kib} KiB"  # this child's own peak
