"""`qbara generate` / `qbara chat` on base + adapter, a native quantized folder and a GGUF file, against
transformers' own greedy `generate`; the chat REPL driven through stdin; bad arguments refused before any load."""
import argparse
import io
import json
import re

import pytest
import torch

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.adapters.io import save_adapter
from qbara.cli import main
from qbara.commands import generate as command
from qbara.models import load_model, tiny_llama
from qbara.pretrained import from_pretrained
from tests.commands.test_export_command import lora_adapter  # noqa: F401 - a fixture
from tests.helpers import randomize_adapters

GREEDY = ["--temperature", "0", "--max-new-tokens", "16"]


def _reference(model, tokenizer, text, max_new_tokens=16):
    """transformers' greedy reply to `text` in the tokenizer's chat template, stopped at EOS or <|im_end|>."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                         pad_token_id=stop[0])[0, len(ids):].tolist()
    new = out[:-1] if out and out[-1] in stop else out
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def _json_lines(args, capsys):
    capsys.readouterr()
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_base_and_adapter_greedy_equals_transformers(lora_adapter, capsys):  # noqa: F811 - the fixture
    args = ["--model", "tiny-llama", "--adapter", str(lora_adapter), *GREEDY]
    (got,) = _json_lines([*args, "--prompt", "Hello there"], capsys)
    model, tokenizer = from_pretrained("tiny-llama", adapter=str(lora_adapter))
    text, count = _reference(model, tokenizer, "Hello there")
    assert (got["prompt"], got["output"], got["tokens"]) == ("Hello there", text, count) and count > 0
    assert text != _reference(*tiny_llama(), "Hello there")[0]  # the check can fail: the adapter changes the reply
    # streamed to stdout: the same text
    capsys.readouterr()
    assert main(["generate", *args, "--prompt", "Hello there"]) == 0
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    assert ("(cut at 16 tokens: --max-new-tokens)" in captured.err) == (got["ended"] == "length")


def test_peft_lora_folder_greedy_equals_peft_and_transformers(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    wrapped.save_pretrained(tmp_path / "peft")
    (got,) = _json_lines(["--model", str(tmp_path / "hf"), "--adapter", str(tmp_path / "peft"), *GREEDY,
                          "--prompt", "Hello"], capsys)
    text, count = _reference(wrapped.eval(), tokenizer, "Hello")
    assert (got["output"], got["tokens"]) == (text, count)
    with wrapped.disable_adapter():  # the check can fail: the LoRA changes the reply
        assert text != _reference(wrapped, tokenizer, "Hello")[0]


def test_prompt_file_gives_one_output_per_prompt(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("Hi\n\nWhat is 2+2?\n")
    got = _json_lines(["--model", "tiny-llama", *GREEDY, "--file", str(path)], capsys)
    model, tokenizer = load_model("tiny-llama")
    assert [(g["prompt"], g["output"]) for g in got] == [(t, _reference(model, tokenizer, t)[0])
                                                         for t in ("Hi", "What is 2+2?")]


def test_raw_feeds_the_plain_text(capsys):
    (got,) = _json_lines(["--model", "tiny-llama", *GREEDY, "--raw", "--prompt", "The cat"], capsys)
    model, tokenizer = load_model("tiny-llama")
    ids = tokenizer("The cat").input_ids
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=[256, 259],
                         pad_token_id=256)[0, len(ids):].tolist()
    new = out[:-1] if out and out[-1] in (256, 259) else out
    assert got["output"] == tokenizer.decode(new, skip_special_tokens=True) and got["prompt_tokens"] == len(ids)


def test_seed_reproduces_sampling(capsys):
    args = ["--model", "tiny-llama", "--prompt", "Once", "--temperature", "1", "--max-new-tokens", "24"]
    first = _json_lines([*args, "--seed", "3"], capsys)
    assert first == _json_lines([*args, "--seed", "3"], capsys)
    assert first != _json_lines([*args, "--seed", "4"], capsys)


def test_native_quantized_folder(tmp_path, capsys):
    model, _ = tiny_llama()  # a QA-HiRA adapter folds into the INT4 blocks: merge --into quantized
    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, 5)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name="tiny-llama")
    folder = tmp_path / "q"
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(folder),
                 "--into", "quantized"]) == 0
    (got,) = _json_lines(["--model", str(folder), *GREEDY, "--prompt", "Hello"], capsys)
    model, tokenizer = load_model(str(folder))
    assert got["output"] == _reference(model, tokenizer, "Hello")[0]


def test_gguf_file_replies_as_the_model_it_was_exported_from(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", "tiny-llama", "--out", str(out), "--dense-type", "f32"]) == 0
    (got,) = _json_lines(["--model", str(out), *GREEDY, "--prompt", "Hello"], capsys)
    model, tokenizer = tiny_llama()  # F32 is lossless: the exported file holds these weights
    text, count = _reference(model, tokenizer, "Hello")
    assert (got["output"], got["tokens"]) == (text, count)


def _chat(monkeypatch, capsys, lines, *args):
    """Run `qbara chat` on `lines` of stdin; (exit code, stdout, stderr, the conversation each reply was asked for,
    the (conversation, budget) sent after fitting it to the context)."""
    seen, sent = [], []
    fit = command.fit_conversation

    def spy(tokenizer, template, messages, budget):
        seen.append([dict(m) for m in messages])
        kept = fit(tokenizer, template, messages, budget)
        sent.append((kept[0], budget))
        return kept

    monkeypatch.setattr(command, "fit_conversation", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    code = main(["chat", "--model", "tiny-llama", *GREEDY, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, seen, sent


def test_chat_keeps_the_history_and_reset_clears_it(monkeypatch, capsys):
    code, out, err, seen, _ = _chat(monkeypatch, capsys, ["Hi", "And then?", "/reset", "Hi"], "--system", "Be kind")
    assert code == 0 and "(conversation cleared)" in err
    assert [[m["role"] for m in conversation] for conversation in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    model, tokenizer = load_model("tiny-llama")
    first = seen[1][2]["content"]
    want = tokenizer.apply_chat_template([{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=True)["input_ids"]
    stop = [256, 259]
    new = model.generate(torch.tensor([want]), do_sample=False, max_new_tokens=16, eos_token_id=stop,
                         pad_token_id=256)[0, len(want):].tolist()
    assert first == tokenizer.decode([t for t in new if t not in stop], skip_special_tokens=True)
    assert out.count(first) >= 2  # the same greedy reply to "Hi" before and after /reset


def test_chat_exit_and_ctrl_c(monkeypatch, capsys):
    code, _, _, seen, _ = _chat(monkeypatch, capsys, ["Hi", "/exit", "never sent"])
    assert code == 0 and len(seen) == 1

    def interrupt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)
    capsys.readouterr()
    assert main(["chat", "--model", "tiny-llama", *GREEDY]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "qbara chat: interrupted"


def test_ctrl_c_in_generate_is_one_line_and_exit_130(monkeypatch, capsys):
    def stopped(*args, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "stream", stopped)
    capsys.readouterr()
    code = main(["generate", "--model", "tiny-llama", "--prompt", "Hi"])
    captured = capsys.readouterr()
    assert code == 130 and captured.out == "partial\n"
    assert captured.err.strip().splitlines() == ["qbara generate: interrupted"]


def test_ctrl_c_during_a_reply_returns_to_the_prompt(monkeypatch, capsys):
    def stopped(*args, **kwargs):
        reply = args[-1]
        reply.text = "partial"
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "stream", stopped)
    code, out, err, seen, _ = _chat(monkeypatch, capsys, ["Hi", "More"])
    assert code == 0 and "(reply stopped)" in err
    assert seen[1][1] == {"role": "assistant", "content": "partial"}  # what was shown stays in the history


def test_chat_cuts_the_oldest_turns_to_fit_the_context(monkeypatch, capsys):
    monkeypatch.setattr(command, "context_length", lambda model, tokenizer: 80)
    code, _, err, seen, sent = _chat(monkeypatch, capsys, ["a" * 20, "b" * 20, "c" * 20, "d" * 90, "e"],
                               "--max-new-tokens", "8")
    assert code == 0 and "dropped the oldest" in err and "context of 80" in err
    _, tokenizer = tiny_llama()
    for asked, (kept, budget) in zip(seen, sent):
        length = len(tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert budget == 72 and kept[-1] == asked[-1] and kept == asked[len(asked) - len(kept):]
        assert length <= budget or (kept == asked[-1:] and length >= 80)  # cut only as far as needed
    assert any(len(kept) < len(asked) for asked, (kept, _) in zip(seen, sent))
    assert "it was not sent" in err  # "d" * 90 does not fit even alone
    assert "d" * 90 not in [m["content"] for m in seen[-1]] and seen[-1][-1]["content"] == "e"


BAD = [
    ([], "give the prompt as --prompt TEXT or --file FILE.*neither"),
    (["--prompt", "x", "--file", "f.txt"], "not both"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be 0"),
    (["--prompt", "x", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-p", "1.01"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["--file", "missing.txt"], "prompt file 'missing.txt' not found"),
    (["--prompt", "x", "--raw", "--system", "s"], "--system needs the chat template")]


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_for_eval", refuse)


def _one_line_error(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, message", BAD)
def test_bad_arguments_fail_before_the_model_loads(no_load, capsys, args, message):
    assert re.search(message, _one_line_error(capsys, ["generate", "--model", "tiny-llama", *args]))


@pytest.mark.parametrize("args, message", [a for a in BAD[2:6]])
def test_bad_chat_settings_fail_before_the_model_loads(no_load, capsys, args, message):
    err = _one_line_error(capsys, ["chat", "--model", "tiny-llama", *args[2:]])
    assert err.startswith("qbara chat: error:") and re.search(message, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_device_cuda_without_a_gpu_fails_before_the_model_loads(no_load, capsys, verb):
    prompt = ["--prompt", "x"] if verb == "generate" else []
    err = _one_line_error(capsys, [verb, "--model", "tiny-llama", "--device", "cuda", *prompt])
    assert "--device cuda: torch sees no CUDA GPU" in err


def test_device_auto_runs_where_torch_sees_a_gpu(monkeypatch):
    args = argparse.Namespace(device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert command._device_of(args) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert command._device_of(args) == "cuda" and command._device_of(argparse.Namespace(device="cpu")) == "cpu"
