"""qbara.generation against transformers: greedy replies equal `model.generate(do_sample=False)`, prompt ids equal
`tokenizer.apply_chat_template(...)`, the nucleus equals `TopPLogitsWarper`'s; streaming gives whole characters."""
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from qbara import AdapterConfig, QbaraError, QuantConfig, prepare
from qbara.generation import (
    GenerationSettings,
    Prompt,
    Reply,
    TextPieces,
    chat_template,
    end_of_turn_id,
    fit_conversation,
    nucleus,
    prompt_ids,
    read_prompts,
    stop_ids,
    stream,
    tokens,
)
from qbara.models import tiny_llama
from qbara.models.tiny import CHATML_TEMPLATE, IM_END
from qbara.train.data import IGNORE_INDEX, build_examples
from tests.helpers import randomize_adapters
from tests.train.test_data import TOK, _bos_tokenizer

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def adapted():
    """tiny-llama on an INT4 G32 base with a non-zero LoRA: a qbara base + adapter."""
    model, tokenizer = tiny_llama()
    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("lora", rank=4, alpha=8))
    randomize_adapters(model, 3)
    return model.eval(), tokenizer


def _transformers_greedy(model, ids, stop, max_new_tokens):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(stop), pad_token_id=sorted(stop)[0])
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in stop else new


@pytest.mark.parametrize("text", ["Hello there", "Write a haiku about rain."])
def test_greedy_equals_transformers_generate(adapted, text):
    model, tokenizer = adapted
    template = chat_template(tokenizer)
    ids = prompt_ids(tokenizer, Prompt.user(text, system="Be brief."), template)
    stop = stop_ids(model, tokenizer, template)
    ours = list(tokens(model, ids, GREEDY, stop))
    assert ours == _transformers_greedy(model, ids, stop, GREEDY.max_new_tokens)
    assert len(ours) > 0


def test_prompt_ids_equal_apply_chat_template():
    _, tokenizer = tiny_llama()
    template = chat_template(tokenizer)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "héllo 世界"}]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(tokenizer, Prompt(messages=messages), template) == want
    assert prompt_ids(tokenizer, Prompt.user("héllo 世界", "You are terse."), template) == want
    # plain text (--raw, or no template): the tokenizer's own encoding of the text
    assert prompt_ids(tokenizer, Prompt(text="héllo"), template) == tokenizer("héllo").input_ids
    assert prompt_ids(tokenizer, Prompt.user("héllo"), None) == tokenizer("héllo").input_ids
    with pytest.raises(QbaraError, match="has no chat template.*drop --system"):
        prompt_ids(tokenizer, Prompt.user("hi", "sys"), None)


def test_prompt_ids_start_with_the_leading_bos_once_as_training_does():
    """A tokenizer that puts a BOS before every text (Gemma): the rendered prompt starts with it once, whether the
    template renders it or not, and is the prompt its training example was made of."""
    messages = [{"role": "user", "content": "hi"}]
    plain = TOK(TOK.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False).input_ids
    for template in (CHATML_TEMPLATE, "{{ bos_token }}" + CHATML_TEMPLATE):
        tok = _bos_tokenizer(template)
        ids = prompt_ids(tok, Prompt.user("hi"), chat_template(tok))
        assert ids == [tok.bos_token_id, *plain]
        (example,) = build_examples([{"instruction": "hi", "output": "yo"}], tok, "instruction", 1024)
        assert example.input_ids[:len(ids)] == ids and example.labels[len(ids)] != IGNORE_INDEX


def test_end_of_turn_is_the_special_token_after_an_assistant_message():
    _, tokenizer = tiny_llama()
    assert end_of_turn_id(tokenizer, chat_template(tokenizer)) == tokenizer.convert_tokens_to_ids(IM_END)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|eot_id|>"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert end_of_turn_id(tokenizer, chat_template(tokenizer)) == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # nothing special after
    assert end_of_turn_id(tokenizer, chat_template(tokenizer)) is None
    assert end_of_turn_id(tokenizer, None) is None


def test_streamed_pieces_are_whole_characters_and_join_to_the_text(adapted):
    model, tokenizer = adapted
    text = "naïve café — 世界 🙂 done"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    pieces = TextPieces(tokenizer)
    out = [pieces.push(i) for i in ids] + [pieces.flush()]
    assert "".join(out) == text and all("\ufffd" not in p for p in out)
    assert "🙂" in out  # the four bytes came out as one piece, once complete
    # a whole reply: the streamed pieces join to the decoded tokens
    template = chat_template(tokenizer)
    prompt = prompt_ids(tokenizer, Prompt.user("Tell me more"), template)
    stop = stop_ids(model, tokenizer, template)
    settings = GenerationSettings(max_new_tokens=40, temperature=1.0, top_p=1.0, seed=5)
    reply = Reply()
    streamed = list(stream(model, tokenizer, prompt, settings, stop, reply=reply))
    generated = list(tokens(model, prompt, settings, stop))
    assert "".join(streamed) == reply.text == tokenizer.decode(generated, skip_special_tokens=True)
    assert reply.tokens == len(generated) and reply.ended == ("length" if len(generated) == 40 else "stop")


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(adapted):
    model, tokenizer = adapted
    template = chat_template(tokenizer)
    ids = prompt_ids(tokenizer, Prompt.user("Once upon a time"), template)
    stop = stop_ids(model, tokenizer, template)

    def sample(seed):
        return list(tokens(model, ids, GenerationSettings(32, temperature=1.0, top_p=0.95, seed=seed), stop))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != list(tokens(model, ids, GREEDY, stop))[:32]


def test_nucleus_keeps_what_transformers_top_p_keeps():
    gen = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.99, 1.0):
        logits = torch.randn(300, generator=gen) * 3
        kept = nucleus(torch.softmax(logits, -1), top_p)
        reference = TopPLogitsWarper(top_p)(None, logits[None].clone())[0]
        assert torch.equal(kept > 0, torch.isfinite(reference)), top_p
        assert kept.sum().item() == pytest.approx(1.0)
        want = torch.softmax(reference, -1)
        assert torch.allclose(kept, want, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max-new-tokens must be"), ({"temperature": -0.1}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"), ({"top_p": 0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top-p must be in \(0, 1\]")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(QbaraError, match=message):
        GenerationSettings(**kwargs)


def test_read_prompts_from_text_and_records(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond prompt\n")
    got = read_prompts(str(txt), system="S")
    assert [p.messages for p in got] == [[{"role": "system", "content": "S"}, {"role": "user", "content": t}]
                                         for t in ("first prompt", "second prompt")]
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"}]))
    assert [p.messages[-1]["content"] for p in read_prompts(str(records))] == ["Add\n\n2 and 3", "Say hi"]
    records.write_text(json.dumps({"instruction": "Add", "output": "5", "system": "Own"}) + "\n")
    assert read_prompts(str(records), system="S")[0].messages == [{"role": "system", "content": "Own"},
                                                                  {"role": "user", "content": "Add"}]
    chats = tmp_path / "c.jsonl"
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    chats.write_text(json.dumps({"messages": conversation}) + "\n")
    (prompt,) = read_prompts(str(chats))
    assert prompt.messages == conversation[:3] and prompt.label == "c"
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "The quick"}) + "\n")
    assert [(p.messages, p.text) for p in read_prompts(str(texts))] == [(None, "The quick")]


@pytest.mark.parametrize("content, message", [
    ("", "no prompts in the file"), ('{"messages": [{"role": "assistant", "content": "x"}]}\n',
                                     "record 1 has no user message"),
    ('{"instruction": 3, "output": "x"}\n', "record 1 field 'instruction' must be a string"),
    ('{"text": "a"}\n[1]\n', "record 2 is not a JSON object")])
def test_bad_prompt_files_name_the_record(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QbaraError, match=message):
        read_prompts(str(path))
    with pytest.raises(QbaraError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_fit_conversation_drops_the_oldest_turns_and_keeps_the_system_message():
    _, tokenizer = tiny_llama()
    template = chat_template(tokenizer)
    system = [{"role": "system", "content": "S"}]
    turns = [[{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(4)]
    messages = system + [m for turn in turns for m in turn] + [{"role": "user", "content": "last"}]

    def length(msgs):
        return len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])

    kept, ids, dropped = fit_conversation(tokenizer, template, messages, length(messages))
    assert (kept, dropped) == (messages, 0) and len(ids) == length(messages)
    budget = length(system + turns[3] + messages[-1:])
    kept, ids, dropped = fit_conversation(tokenizer, template, messages, budget)
    assert dropped == 3 and kept == system + turns[3] + messages[-1:] and len(ids) == budget
    kept, _, dropped = fit_conversation(tokenizer, template, messages, 1)  # only the last turn is left
    assert dropped == 4 and kept == system + messages[-1:]


class _Scripted(torch.nn.Module):
    """A stand-in model whose next token is always the next one of `script` (a one-hot logit), whatever it is fed."""

    def __init__(self, script, vocab, like):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.fed = list(script), vocab, []
        self.config, self.generation_config = like.config, like.generation_config

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        self.fed.append(input_ids[0].tolist())
        logits = torch.full((1, 1, self.vocab), -1e4)
        logits[0, -1, self.script[len(self.fed) - 1]] = 0.0
        return SimpleNamespace(logits=logits, cache=len(self.fed))


@pytest.mark.parametrize("end", [IM_END, "<|endoftext|>"])
def test_a_reply_ends_at_the_end_of_turn_token_or_eos(end):
    like, tokenizer = tiny_llama()
    template = chat_template(tokenizer)
    text = tokenizer("Fine, thanks", add_special_tokens=False).input_ids
    script = text + [tokenizer.convert_tokens_to_ids(end)] + text
    model = _Scripted(script, len(tokenizer), like)
    prompt = prompt_ids(tokenizer, Prompt.user("How are you?"), template)
    reply = Reply()
    pieces = list(stream(model, tokenizer, prompt, GenerationSettings(50, temperature=0), stop_ids(
        like, tokenizer, template), reply=reply))
    assert "".join(pieces) == "Fine, thanks" and (reply.tokens, reply.ended) == (len(text), "stop")
    # the prompt once, then each new token alone (the KV cache holds the rest)
    assert model.fed == [prompt] + [[t] for t in text]
    model = _Scripted(script, len(tokenizer), like)
    list(stream(model, tokenizer, prompt, GenerationSettings(5, temperature=0), set(), reply=(cut := Reply())))
    assert (cut.text, cut.tokens, cut.ended) == ("Fine,", 5, "length")


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_streaming_with_real_tokenizers_gives_whole_characters(name):
    """Real vocabularies (SmolLM2's byte-level BPE; Gemma 3's SentencePiece-style pieces with byte fallback),
    where tokens hold several characters or parts of one."""
    from qbara.models.embedded import embedded_model
    from qbara.models.loader import embedded_folder, load_tokenizer

    if importlib.util.find_spec(embedded_model(name).module) is None:
        pytest.skip(f"the package of {name} is not installed (bash scripts/setup.sh --models)")
    tokenizer = load_tokenizer(embedded_folder(name))
    text = "Grüße aus Köln! 東京は雨です 🙂🎉 — naïve   spacing\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = TextPieces(tokenizer)
    out = [pieces.push(i) for i in ids] + [pieces.flush()]
    assert "".join(out) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in out) and sum(1 for p in out if p) > 10
