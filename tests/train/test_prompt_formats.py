"""data.template (issue 27): the named prompt formats against the format definitions written out here and against
transformers' apply_chat_template / plain jinja2 with the same text; `auto`; instruction records as conversations;
the training prompt equal, token for token, to the inference prompt; bad choices refused at config time."""
import jinja2
import pytest

from qbara.errors import QbaraError
from qbara.models.tiny import byte_tokenizer
from qbara.prompt_formats import CHOICES, NAMED, resolve_template
from qbara.train.config import build_config
from qbara.train.data import IGNORE_INDEX, build_examples

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
               {"role": "assistant", "content": "6"}]
PLAIN_CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
EOS = "<|endoftext|>"
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.")


# Each format as its definition spells it, one function per format: (messages, add_generation_prompt) -> text.
def alpaca(messages, generate=False):
    text, turns = (messages[0]["content"] + "\n\n", messages[1:]) if messages[0]["role"] == "system" else \
        (PREAMBLE + "\n\n", messages)
    first_user = True
    for m in turns:
        if m["role"] == "user":
            text += ("" if first_user else "\n\n") + "### Instruction:\n" + m["content"] + "\n\n"
            first_user = False
        else:
            text += "### Response:\n" + m["content"] + EOS
    return text + ("### Response:\n" if generate else "")


def chatml(messages, generate=False):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generate else "")


def llama3(messages, generate=False):
    text = "<|begin_of_text|>" + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                                         for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generate else "")


def gemma(messages, generate=False):
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    text = "<bos>"
    for i, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else "user"
        text += f"<start_of_turn>{role}\n{system if i == 0 else ''}{m['content']}<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if generate else "")


DEFINITIONS = {"alpaca": alpaca, "chatml": chatml, "llama3": llama3, "gemma": gemma}
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>",
           "<end_of_turn>"]


def _tokenizer(template=None):
    """The byte tokenizer (ChatML's markers are its special tokens) with Llama 3's and Gemma's markers added."""
    tok = byte_tokenizer()
    tok.add_tokens(MARKERS, special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("messages", [SYSTEM_CHAT, PLAIN_CHAT], ids=["system-2-turns", "1-turn"])
def test_named_format_renders_its_definition(name, messages):
    fmt = resolve_template(name, _tokenizer())
    hf = _tokenizer(fmt.text)
    plain = jinja2.Environment().from_string(fmt.text)  # no trim_blocks / lstrip_blocks
    for upto in range(1, len(messages) + 1):
        for generate in (False, True):
            want = DEFINITIONS[name](messages[:upto], generate)
            assert fmt.template.render(messages[:upto], add_generation_prompt=generate) == want
            assert hf.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generate) == want
            assert plain.render(messages=messages[:upto], add_generation_prompt=generate, eos_token=EOS,
                                raise_exception=None) == want


def test_alpaca_single_turn_is_the_classic_prompt():
    text = resolve_template("alpaca", _tokenizer()).template.render(PLAIN_CHAT)
    assert text == (PREAMBLE + "\n\n### Instruction:\nHello there\n\n### Response:\nHi!" + EOS)


def test_auto_is_the_tokenizers_template_else_alpaca():
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    fmt = resolve_template("auto", _tokenizer(own))
    assert fmt.name == "tokenizer" and fmt.text == own
    fmt = resolve_template("auto", _tokenizer(None))
    assert fmt.name == "alpaca" and fmt.text == NAMED["alpaca"]


def test_markers_that_are_not_single_tokens_are_warned_about_once():
    with pytest.warns(UserWarning, match=r"data.template llama3: <\|begin_of_text\|>.* are not a single token") as got:
        resolve_template("llama3", byte_tokenizer())
    assert len(got) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_template("chatml", byte_tokenizer())  # <|im_start|> / <|im_end|> are its special tokens
        resolve_template("gemma", _tokenizer())


@pytest.mark.parametrize("name", NAMED)
def test_instruction_record_is_system_user_assistant(name):
    record = {"system": "You translate.", "instruction": "Translate.", "input": "bonjour", "output": "hello"}
    messages = [{"role": "system", "content": "You translate."},
                {"role": "user", "content": "Translate.\n\nbonjour"}, {"role": "assistant", "content": "hello"}]
    tok = _tokenizer()
    (example,) = build_examples([record], tok, "instruction", 1024, template=name)
    assert example.input_ids == tok(DEFINITIONS[name](messages), add_special_tokens=False).input_ids


@pytest.mark.parametrize("name", [*NAMED, "auto"])
@pytest.mark.parametrize("records", [
    [{"instruction": "Add 2 and 3.", "output": "5"}],
    [{"messages": SYSTEM_CHAT}],
], ids=["instruction", "chat"])
def test_training_prompt_is_the_inference_prompt_token_for_token(name, records):
    """For every assistant turn: tokenizer(render(messages before it, add_generation_prompt=True)) is where the
    training ids start learning that turn, and what comes before it in the training ids."""
    tok = _tokenizer(NAMED["chatml"])
    (example,) = build_examples(records, tok, "auto", 1024, template=name)
    messages = records[0].get("messages") or [{"role": "user", "content": "Add 2 and 3."},
                                              {"role": "assistant", "content": "5"}]
    text = NAMED["chatml"] if name == "auto" else NAMED[name]
    inference = _tokenizer(text)
    learned_from = [i for i, label in enumerate(example.labels)
                    if label != IGNORE_INDEX and (i == 0 or example.labels[i - 1] == IGNORE_INDEX)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(learned_from) == len(turns)
    for start, turn in zip(learned_from, turns):
        prompt = inference.apply_chat_template(messages[:turn], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert example.input_ids[:start] == list(prompt)


def test_text_data_takes_no_template():
    (example,) = build_examples([{"text": "a" * 40}], _tokenizer(), "text", 16, template="llama3")[:1]
    assert example.input_ids == list(b"a" * 16)


@pytest.mark.parametrize("choice", CHOICES)
def test_config_accepts_each_name(choice):
    assert build_config({"data": {"template": choice}}).data.template == choice


def test_config_accepts_a_jinja_file_and_refuses_bad_ones(tmp_path):
    good = tmp_path / "t.jinja"
    good.write_text(NAMED["chatml"])
    assert build_config({"data": {"template": str(good)}}).data.template == str(good)
    fmt = resolve_template(str(good), _tokenizer())
    assert fmt.text == NAMED["chatml"] and fmt.name == str(good)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    cases = {"chatm": "not a template name", str(tmp_path / "none.jinja"): "no such file",
             str(tmp_path): "a folder", str(broken): "TemplateSyntaxError"}
    for choice, why in cases.items():
        with pytest.raises(QbaraError) as err:
            build_config({"data": {"template": choice}})
        message = str(err.value)
        assert why in message and "\n" not in message, message
        if why != "TemplateSyntaxError":
            assert "auto, alpaca, chatml, llama3, gemma" in message
    binary = tmp_path / "b.jinja"
    binary.write_bytes(b"\x00\x01")
    with pytest.raises(QbaraError, match="binary"):
        build_config({"data": {"template": str(binary)}})


def _merging_tokenizer():
    """A byte-level BPE whose one merge joins two newlines, with no pre-tokenizer split: tokenizing a prompt
    ending in a newline together with an answer starting with one merges across the boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qbara.models.tiny import _bytes_to_unicode

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab[table[10] * 2] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(table[10], table[10])]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS)


def test_prompt_tokens_stay_the_inference_ones_where_the_tokenizer_would_merge_across():
    tok = _merging_tokenizer()
    record = {"instruction": "Say it.", "output": "\nfive"}
    (example,) = build_examples([record], tok, "instruction", 1024, template="alpaca")
    prompt = tok(alpaca([{"role": "user", "content": "Say it."}], generate=True), add_special_tokens=False).input_ids
    whole = tok(alpaca([{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "\nfive"}]),
                add_special_tokens=False).input_ids
    assert whole[:len(prompt)] != prompt  # tokenized in one piece, the prompt's last newline merges away
    assert example.input_ids[:len(prompt)] == prompt
    assert example.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert tok.decode(example.labels[len(prompt):]) == "\nfive" + EOS
