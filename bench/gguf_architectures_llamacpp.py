"""Benchmark: qbara's GGUF export of every architecture (llama, mistral, qwen2, qwen3, gemma3, phi3) run in real
llama.cpp (llama-cpp-python), plus the fine-tuned Gemma 3 270M.

Per architecture, a tiny random model as in tests/export/test_gguf_architectures.py (hidden 64, 4 heads of 16,
2 KV heads, intermediate 128), with a byte-level BPE tokenizer with merges (bpe_tokenizer) and 3 layers
instead of 2 so that the mixed base cycles through three gguf:* formats:
  q4_1   INT4 G32 + QA-HiRA (rank 4, alpha 8, random non-zero adapter weights), merge(into="quantized"),
         export_gguf(..., embedding_type="f32"): every linear written exactly as Q4_1.
  F32    control: the same file with every tensor dequantized to F32 (gguf_llamacpp.write_f32_copy), run with an
         F32 KV cache: llama.cpp's arithmetic is plain fp32, so it must match qbara to ~1e-5 relative, which
         proves names, layout (rotary row order, fused Phi-3 tensors, Gemma's norm + 1) and metadata.
  mixed  a gguf:* base: layer i's linears in gguf:q4_0 / q5_0 / q8_0 (i mod 3), embedding F32; and its F32 copy.
Gemma 3 270M (qbara.load_model("gemma3-270m")): INT4 G32 + QA-HiRA rank 8, --steps AdamW steps (lr --lr) on a
Shakespeare snippet (one new window per step), merge(into="quantized"), exported to Q4_1 (embedding F32) and its
F32 copy; logits on --gemma-tokens tokens of another passage; llama.cpp's own tokenizer (`Llama.tokenize`, vocab
only) against qbara's on a few strings.
Gemma 3 270M as a gguf:* mixed base (no training, a base-quantization check): layer i's linears in gguf:q4_0 /
q5_0 / q8_0 (i mod 3), except those whose input width is a multiple of 256 (o_proj 1024, down_proj 2048; the
640-wide rows of the others fit no K-quant block) in gguf:q4_k / q5_k / q6_k; embedding F32; and its F32 copy.
`--only gemma-mix` runs just this case and merges its rows into the existing results files.

llama.cpp runs in the llama-cpp-python interpreter through gguf_llamacpp.py's worker (logits back as .npy);
this file is also its own worker for the tokenizer check (`--tokenize-worker JOB.json`), so it imports only the
standard library, numpy and gguf_llamacpp at top level.

    nice -n 10 python3 bench/gguf_architectures_llamacpp.py [--threads 2] [--out bench/results] [--only gemma-mix]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from gguf_llamacpp import (
    LLAMA_PYTHON,
    compare,
    dense_weight,
    plain_cpu_buffers,
    qbara_logits,
    run_llama,
    write_f32_copy,
)

HERE = Path(__file__).resolve()
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
MIXED_CYCLE = ("gguf:q4_0", "gguf:q5_0", "gguf:q8_0")
MIXED_K_CYCLE = ("gguf:q4_k", "gguf:q5_k", "gguf:q6_k")  # Gemma mix: linears whose input width is a multiple of 256
GEMMA_MIX_ARCH = "gemma3-270m (gguf:* mixed base)"
TOKENIZER_STRINGS = ["Hello, world!", "To be, or not to be: that is the question.",
                     "  leading spaces and\ttabs\nnew lines", "naïve café — 東京 🤖", "x = f(y) + 3.14159;"]


# ======================================================================================= llama.cpp side
def tokenize_worker(job_path: str) -> None:
    """Tokenize each string with llama.cpp's tokenizer of the GGUF (vocab only, no weights loaded)."""
    from llama_cpp import Llama

    plain_cpu_buffers()
    job = json.loads(Path(job_path).read_text())
    llm = Llama(model_path=job["model"], vocab_only=True, verbose=False)
    ids = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in job["strings"]]
    Path(job["result"]).write_text(json.dumps(ids))


# ======================================================================================= qbara side
def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with merges (trained on a Shakespeare snippet): the test suite's byte tokenizer
    has none, and llama.cpp refuses a "gpt2" vocabulary without tokenizer.ggml.merges (an empty GGUF array cannot
    be written), so the tiny models here carry this one instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from qbara.data import shakespeare_text
    from qbara.models.tiny import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    core.train_from_iterator([shakespeare_text("macbeth", max_chars=20000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False)


def tiny_model(arch: str, seed: int = 0):
    """The test suite's tiny random model of `arch` (3 layers here, `bpe_tokenizer`)."""
    from qbara.models.tiny import tiny_architecture

    return tiny_architecture(arch, bpe_tokenizer(), seed=seed, layers=3)


def randomize_adapters(model, seed: int, std: float) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def ggml_gelu(x):
    """ggml-cpu's GELU (GGML_GELU_FP16): input rounded to fp16, looked up in an fp16 table of tanh-GELU, 0 below
    -10 and x above 10. Used to show that Gemma's F32 residual is this activation, not the file."""
    import torch
    import torch.nn.functional as F

    y = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def ggml_gelu_logits(model, ids: list[int]) -> np.ndarray:
    """qbara's logits with every MLP's activation swapped for ggml_gelu (restored after)."""
    import torch

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return ggml_gelu(x)

    saved = [layer.mlp.act_fn for layer in model.model.layers]
    for layer in model.model.layers:
        layer.mlp.act_fn = GgmlGelu()
    try:
        return qbara_logits(model, ids)
    finally:
        for layer, act in zip(model.model.layers, saved):
            layer.mlp.act_fn = act


def q8_activations(x, block: int):
    """x rounded as llama.cpp's CPU matmuls quantize a quantized linear's input: 8-bit blocks of `block` values
    along the row, scale max|x| / 127 (Q8_0: 32 values, fp16 scale; Q8_K: 256 values, fp32 scale)."""
    import torch

    rows = x.reshape(-1, block)
    scale = rows.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if block == 32:
        scale = scale.half().float()
    return (torch.round(rows / scale).clamp(-127, 127) * scale).reshape(x.shape)


def q8_activation_logits(model, configs: dict, ids: list[int]) -> np.ndarray:
    """qbara's logits with every quantized linear's input rounded by q8_activations (Q8_K for K-quants, else Q8_0):
    how far llama.cpp's activation rounding alone moves the logits."""
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda _m, a, block=256 if cfg.format.endswith("_k") else 32: (q8_activations(a[0], block),))
        for name, cfg in configs.items()]
    try:
        return qbara_logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()


def export_pair(model, tokenizer, path: Path) -> dict:
    """export_gguf with an F32 embedding, plus the all-F32 copy; returns the report's numbers."""
    from qbara.export import export_gguf

    t = time.perf_counter()
    report = export_gguf(model, tokenizer, path, embedding_type="f32", overwrite=True)
    export_s = time.perf_counter() - t
    write_f32_copy(path, path.with_suffix(".F32.gguf"))
    return {"formats": report.format_counts, "lossless": report.lossless, "bytes": report.size_bytes,
            "architecture": report.architecture, "export_seconds": export_s,
            "f32_bytes": path.with_suffix(".F32.gguf").stat().st_size}


def tiny_cases(args, work: Path, ids: list[int]):
    """Every architecture: the folded Q4_1 file, the mixed gguf:* file, their F32 copies, qbara's logits."""
    import torch

    import qbara
    from qbara import AdapterConfig, QuantConfig

    refs, runs, info = {}, [], {}
    for arch in ARCHS:
        model, tokenizer = tiny_model(arch, args.seed)
        qbara.prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=4, alpha=8))
        randomize_adapters(model, args.seed, std=0.02)
        with torch.no_grad():
            adapter_logits = qbara_logits(model, ids)
        qbara.merge(model, into="quantized")
        refs[(arch, "q4_1")] = qbara_logits(model, ids)
        if arch == "gemma3":
            refs[(arch, "q4_1 ggml-gelu")] = ggml_gelu_logits(model, ids)
        fold_rel = float(np.linalg.norm(refs[(arch, "q4_1")] - adapter_logits) / np.linalg.norm(adapter_logits))
        path = work / f"{arch}-q4_1.gguf"
        info[arch] = {"q4_1": export_pair(model, tokenizer, path), "fold_rel_change": fold_rel,
                      "config": {"layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                 "intermediate": 128, "vocab": len(tokenizer)}}
        runs += [{"name": f"{arch} q4_1", "model": str(path)},
                 {"name": f"{arch} q4_1 F32", "model": str(path.with_suffix(".F32.gguf")), "kv_f32": True}]

        model, tokenizer = tiny_model(arch, args.seed)
        qbara.prepare(model, {f"model.layers.{i}.{sub}": QuantConfig(MIXED_CYCLE[i % len(MIXED_CYCLE)])
                              for i in range(3) for sub, mod in model.model.layers[i].named_modules()
                              if isinstance(mod, torch.nn.Linear)})
        refs[(arch, "mixed")] = qbara_logits(model, ids)
        path = work / f"{arch}-mixed.gguf"
        info[arch]["mixed"] = export_pair(model, tokenizer, path)
        runs += [{"name": f"{arch} mixed", "model": str(path)},
                 {"name": f"{arch} mixed F32", "model": str(path.with_suffix(".F32.gguf")), "kv_f32": True}]
        print(f"{arch}: exported ({info[arch]['q4_1']['formats']}; mixed {info[arch]['mixed']['formats']})")
    return refs, runs, info


def gemma_text_ids(args, tokenizer) -> list[int]:
    """Token ids of the 20000-character passage of --play both Gemma cases train / evaluate on."""
    from qbara.data import shakespeare_text

    text = shakespeare_text(args.play, max_chars=20000)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def gemma_mix_configs(model) -> dict:
    """Layer name -> QuantConfig of the Gemma mixed base: MIXED_CYCLE by layer index, MIXED_K_CYCLE where the
    input width fits 256-weight K-quant blocks."""
    import torch

    from qbara import QuantConfig

    configs = {}
    for i, layer in enumerate(model.model.layers):
        for sub, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                cycle = MIXED_K_CYCLE if mod.in_features % 256 == 0 else MIXED_CYCLE
                configs[f"model.layers.{i}.{sub}"] = QuantConfig(cycle[i % len(cycle)])
    return configs


def gemma_mix_case(args, work: Path):
    """Gemma 3 270M, decoder linears in a gguf:* mix (gemma_mix_configs), exported with an F32 embedding."""
    from collections import Counter

    import qbara

    seconds = {}
    t = time.perf_counter()
    model, tokenizer = qbara.load_model("gemma3-270m")
    model = model.float().eval()
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    configs = gemma_mix_configs(model)
    qbara.prepare(model, configs)
    seconds["prepare"] = time.perf_counter() - t
    eval_ids = gemma_text_ids(args, tokenizer)[-args.gemma_tokens:]
    t = time.perf_counter()
    ref = qbara_logits(model, eval_ids)
    seconds["qbara_forward"] = time.perf_counter() - t
    ref_gelu = ggml_gelu_logits(model, eval_ids)
    ref_q8 = q8_activation_logits(model, configs, eval_ids)
    path = work / "gemma3-270m-mixed.gguf"
    t = time.perf_counter()
    export = export_pair(model, tokenizer, path)
    seconds["export_and_f32_copy"] = time.perf_counter() - t
    decode_job = gemma_decode_job(model, path, work / "expected")
    by_module = {}
    for name, cfg in configs.items():
        by_module.setdefault(name.rsplit(".", 1)[-1], []).append(cfg.format)
    info = {"eval_tokens": len(eval_ids), "cycle": list(MIXED_CYCLE), "k_cycle": list(MIXED_K_CYCLE),
            "formats_by_module": {m: dict(Counter(f)) for m, f in by_module.items()}, "export": export,
            "seconds": seconds}
    return path, ref, ref_gelu, ref_q8, eval_ids, decode_job, info


def gemma_decode_job(model, path: Path, folder: Path) -> dict:
    """A ggml decode check (gguf_llamacpp's worker): every quantized tensor of the Gemma GGUF at `path` with
    qbara's fp32 weight for it (gemma3 keeps HF's q/k row order) saved as .npy."""
    from gguf import GGUFReader

    from qbara.export.gguf.architectures import ARCHITECTURES

    folder.mkdir(parents=True, exist_ok=True)
    modules = {f"blk.{i}.{slot.gguf}.weight": layer.get_submodule(slot.hf)
               for i, layer in enumerate(model.model.layers) for slot in ARCHITECTURES["gemma3"].linears}
    tensors = []
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        expect = folder / f"{t.name}.npy"
        np.save(expect, dense_weight(modules[t.name]).contiguous().numpy().astype(np.float32))
        tensors.append({"name": t.name, "offset": int(t.data_offset), "n_bytes": int(t.n_bytes),
                        "n_elements": int(t.n_elements), "type": int(t.tensor_type),
                        "type_name": t.tensor_type.name, "expect": str(expect)})
    return {"label": "gemma3-270m mixed", "file": str(path), "tensors": tensors}


def gemma_mix_rows(args, work: Path):
    """Run gemma_mix_case's file and its F32 copy in llama.cpp; rows against qbara (F32 also against qbara with
    ggml's fp16 GELU) and the case's info."""
    t = time.perf_counter()
    path, ref, ref_gelu, ref_q8, eval_ids, decode_job, info = gemma_mix_case(args, work)
    info["seconds"]["qbara_total"] = time.perf_counter() - t
    t = time.perf_counter()
    sub = work / "decode"
    sub.mkdir(exist_ok=True)
    try:  # ggml's own to_float on every quantized tensor of the file, against qbara's weights
        _, _, checks = run_llama([], [decode_job], eval_ids, None, SimpleNamespace(**{**vars(args), "n_ctx": 128}),
                                 sub)
        info["ggml_decode"] = checks[0]
    except subprocess.CalledProcessError as exc:
        info["ggml_decode"] = f"llama.cpp decode worker exited with {exc.returncode}"
    info["seconds"]["ggml_decode"] = time.perf_counter() - t
    runs = [{"name": "gemma3-270m mixed", "model": str(path)},
            {"name": "gemma3-270m mixed F32", "model": str(path.with_suffix(".F32.gguf")), "kv_f32": True}]
    t = time.perf_counter()
    logits, run_info, errors = guarded_llama(runs, eval_ids, args, work, n_ctx=128)
    info["seconds"]["llama_cpp_runs"] = {r["name"]: r["seconds"] for r in run_info}
    info["seconds"]["llama_cpp_total"] = time.perf_counter() - t
    rows = [{**compare("gemma3-270m", "qbara with Q8 activations vs qbara", ref_q8, ref, eval_ids,
                       engines=("qbara Q8 activations", "qbara")), "arch": GEMMA_MIX_ARCH,
             "file": "no llama.cpp: qbara with llama.cpp's Q8_0 / Q8_K activation rounding emulated, vs qbara"}]
    for run in runs:
        kind = run["name"].split(" ", 1)[1]
        if run["name"] not in logits:
            rows.append({"case": "gemma3-270m", "arch": GEMMA_MIX_ARCH, "file": kind, "error": errors[run["name"]]})
            continue
        rows.append({**compare("gemma3-270m", kind, logits[run["name"]], ref, eval_ids), "arch": GEMMA_MIX_ARCH,
                     "file": kind})
        if kind.endswith("F32"):
            row = compare("gemma3-270m", f"{kind} vs qbara with ggml's fp16 GELU", logits[run["name"]], ref_gelu,
                          eval_ids)
            rows.append({**row, "arch": GEMMA_MIX_ARCH, "file": f"{kind}, qbara with ggml's fp16 GELU"})
        else:
            row = compare("gemma3-270m", f"{kind} vs qbara with Q8 activations", logits[run["name"]], ref_q8,
                          eval_ids)
            rows.append({**row, "arch": GEMMA_MIX_ARCH,
                         "file": f"{kind}, qbara with Q8_0 / Q8_K activation rounding emulated"})
    return rows, info


def gemma_case(args, work: Path):
    """Gemma 3 270M: INT4 G32 + QA-HiRA, a few training steps, fold, export; qbara's logits and tokenizer ids."""
    import torch

    import qbara
    from qbara import AdapterConfig, QuantConfig

    seconds = {}
    t = time.perf_counter()
    model, tokenizer = qbara.load_model("gemma3-270m")
    model = model.float()
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    qbara.prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("qahira", rank=args.rank,
                                                                            alpha=2 * args.rank))
    seconds["prepare"] = time.perf_counter() - t
    all_ids = gemma_text_ids(args, tokenizer)
    windows = [torch.tensor([all_ids[k * args.train_tokens:(k + 1) * args.train_tokens]]) for k in range(args.steps)]
    eval_ids = all_ids[-args.gemma_tokens:]
    assert len(all_ids) >= (args.steps + 1) * args.train_tokens, "text too short for --steps x --train-tokens"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    t = time.perf_counter()
    for train_ids in windows:  # one new window of the play per step
        loss = model(train_ids, labels=train_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    seconds["train"] = time.perf_counter() - t
    model.eval()
    print(f"gemma3-270m: {args.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({seconds['train']:.0f} s)")
    adapter_logits = qbara_logits(model, eval_ids)
    qbara.merge(model, into="quantized")
    t = time.perf_counter()
    ref = qbara_logits(model, eval_ids)
    seconds["qbara_forward"] = time.perf_counter() - t
    ref_gelu = ggml_gelu_logits(model, eval_ids)
    fold_rel = float(np.linalg.norm(ref - adapter_logits) / np.linalg.norm(adapter_logits))
    path = work / "gemma3-270m-qahira-q4_1.gguf"
    t = time.perf_counter()
    export = export_pair(model, tokenizer, path)
    seconds["export_and_f32_copy"] = time.perf_counter() - t
    qbara_tok = [[int(i) for i in tokenizer(s, add_special_tokens=False)["input_ids"]] for s in TOKENIZER_STRINGS]
    info = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "alpha": 2 * args.rank,
            "train_tokens": args.train_tokens, "eval_tokens": len(eval_ids), "losses": losses,
            "fold_rel_change": fold_rel, "export": export, "seconds": seconds}
    return path, ref, ref_gelu, eval_ids, qbara_tok, info


def transformers_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of the GGUF at `path` read by transformers' own GGUF reader (an engine independent of both)."""
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_tokenize(args, model_path: Path, work: Path) -> list[list[int]]:
    job = {"model": str(model_path), "strings": TOKENIZER_STRINGS, "result": str(work / "tokenize.json")}
    (work / "tokenize_job.json").write_text(json.dumps(job))
    subprocess.run([args.llama_python, str(HERE), "--tokenize-worker", str(work / "tokenize_job.json")], check=True)
    return json.loads((work / "tokenize.json").read_text())


def guarded_llama(runs, ids, args, work: Path, n_ctx: int):
    """run_llama, each file in its own worker so that one crash (load error, abort) is reported, not fatal."""
    logits, infos, errors = {}, [], {}
    for run in runs:
        sub = work / f"job-{len(infos) + len(errors)}"
        sub.mkdir(exist_ok=True)
        try:
            got, info, _ = run_llama([dict(run)], [], ids, None, SimpleNamespace(**{**vars(args), "n_ctx": n_ctx}),
                                     sub)
            logits.update(got)
            infos += info
        except subprocess.CalledProcessError as exc:
            errors[run["name"]] = f"llama.cpp worker exited with {exc.returncode}"
            print(f"  llama.cpp {run['name']}: FAILED ({errors[run['name']]}; its stderr is above)")
    return logits, infos, errors


# ======================================================================================= main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48, help="token ids per tiny model (random, < 256)")
    parser.add_argument("--gemma-tokens", type=int, default=64)
    parser.add_argument("--train-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--only", choices=["gemma-mix", "gemma-control"], default=None,
                        help="run only this case and merge its rows into the existing results files in --out")
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--extra-bufts", action="store_true", help="see gguf_llamacpp.py")
    parser.add_argument("--out", default=str(HERE.parent / "results"))
    parser.add_argument("--keep", default=None, help="folder to keep the GGUF files in (default: temporary)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbara-arch-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)

    if args.only == "gemma-mix":
        return merge_case(args, work, start, gemma_mix_rows, GEMMA_MIX_ARCH, "gemma3_270m_mixed")
    if args.only == "gemma-control":
        return merge_case(args, work, start, gemma_control_rows, GEMMA_CONTROL_ARCH,
                          "gemma3_270m_llamacpp_quantized")

    ids = [int(i) for i in torch.randint(0, 256, (args.tokens,), generator=torch.Generator().manual_seed(3))]
    t = time.perf_counter()
    refs, runs, tiny_info = tiny_cases(args, work, ids)
    tiny_qbara_s = time.perf_counter() - t
    t = time.perf_counter()
    llama, llama_info, errors = guarded_llama(runs, ids, args, work, n_ctx=64)
    tiny_llama_s = time.perf_counter() - t
    rows = []
    print("\nlogits, llama.cpp vs qbara:")
    for arch in ARCHS:
        for kind in ("q4_1", "mixed"):
            for suffix in ("", " F32"):
                name = f"{arch} {kind}{suffix}"
                if name in llama:
                    row = compare(arch, f"{kind}{suffix}", llama[name], refs[(arch, kind)], ids)
                    row.update(arch=arch, file=f"{kind}{suffix}")
                    rows.append(row)
                    if (arch, f"{kind} ggml-gelu") in refs and suffix:
                        row = compare(arch, f"{kind}{suffix} vs qbara with ggml's fp16 GELU", llama[name],
                                      refs[(arch, f"{kind} ggml-gelu")], ids)
                        row.update(arch=arch, file=f"{kind}{suffix}, qbara with ggml's fp16 GELU table")
                        rows.append(row)
                else:
                    rows.append({"case": arch, "arch": arch, "file": f"{kind}{suffix}", "error": errors[name]})

    gemma = None
    if not args.skip_gemma:
        t = time.perf_counter()
        path, ref, ref_gelu, eval_ids, qbara_tok, gemma = gemma_case(args, work)
        gemma["seconds"]["qbara_total"] = time.perf_counter() - t
        t = time.perf_counter()
        g_runs = [{"name": "gemma3-270m q4_1", "model": str(path)},
                  {"name": "gemma3-270m q4_1 F32", "model": str(path.with_suffix(".F32.gguf")), "kv_f32": True}]
        g_llama, g_info, g_errors = guarded_llama(g_runs, eval_ids, args, work, n_ctx=128)
        gemma["seconds"]["llama_cpp_runs"] = {r["name"]: r["seconds"] for r in g_info}
        gemma["seconds"]["llama_cpp_total"] = time.perf_counter() - t
        t = time.perf_counter()
        hf = transformers_logits(path.with_suffix(".F32.gguf"), eval_ids)
        gemma["seconds"]["transformers_f32_file"] = time.perf_counter() - t
        row = compare("gemma3-270m", "F32 file in transformers vs qbara", hf, ref, eval_ids,
                      engines=("transformers", "qbara"))
        rows.append({**row, "arch": "gemma3-270m (QA-HiRA fine-tuned)",
                     "file": "q4_1 F32 read by transformers' GGUF reader, vs qbara"})
        if "gemma3-270m q4_1 F32" in g_llama:
            row = compare("gemma3-270m", "llama.cpp F32 vs transformers on the F32 file",
                          g_llama["gemma3-270m q4_1 F32"], hf, eval_ids, engines=("llama.cpp", "transformers"))
            rows.append({**row, "arch": "gemma3-270m (QA-HiRA fine-tuned)",
                         "file": "q4_1 F32 in llama.cpp vs the same file in transformers"})
        try:
            llama_tok = llama_tokenize(args, path, work)
            gemma["tokenizer"] = [{"text": s, "qbara": q, "llama_cpp": lt, "same": q == lt}
                                  for s, q, lt in zip(TOKENIZER_STRINGS, qbara_tok, llama_tok)]
        except subprocess.CalledProcessError as exc:
            gemma["tokenizer"] = f"llama.cpp tokenizer worker exited with {exc.returncode}"
        for r in g_runs:
            kind = r["name"].split(" ", 1)[1]
            if r["name"] in g_llama:
                row = compare("gemma3-270m", kind, g_llama[r["name"]], ref, eval_ids)
                row.update(arch="gemma3-270m (QA-HiRA fine-tuned)", file=kind)
                rows.append(row)
                if kind.endswith("F32"):
                    row = compare("gemma3-270m", f"{kind} vs qbara with ggml's fp16 GELU", g_llama[r["name"]],
                                  ref_gelu, eval_ids)
                    row.update(arch="gemma3-270m (QA-HiRA fine-tuned)", file=f"{kind}, qbara with ggml's fp16 GELU")
                    rows.append(row)
            else:
                rows.append({"case": "gemma3-270m", "arch": "gemma3-270m (QA-HiRA fine-tuned)", "file": kind,
                             "error": g_errors[r["name"]]})

    gemma_mix = None
    if not args.skip_gemma:
        mix_rows, gemma_mix = gemma_mix_rows(args, work)
        rows += mix_rows

    results = {
        "setup": {"tokens": len(ids), "threads": args.threads, "seed": args.seed, "bos": False,
                  "llama_cpp_python": llama_version(args), "llama_extra_bufts": args.extra_bufts,
                  "tiny": tiny_info, "mixed_cycle": list(MIXED_CYCLE)},
        "gemma3_270m": gemma,
        "gemma3_270m_mixed": gemma_mix,
        "rows": rows,
        "seconds": {"tiny_qbara": tiny_qbara_s, "tiny_llama_cpp": tiny_llama_s,
                    "tiny_llama_cpp_runs": {r["name"]: r["seconds"] for r in llama_info},
                    "wall": time.perf_counter() - start},
    }
    write_results(results, args, work)


def merge_case(args, work: Path, start: float, case, arch: str, info_key: str) -> None:
    """--only CASE: run `case` (gemma_mix_rows, gemma_control_rows) and put its rows into the results files already
    in --out (the previous rows of `arch` replaced, its info under `info_key`), every other row left as it was."""
    path = Path(args.out) / "gguf_architectures_llamacpp.json"
    results = json.loads(path.read_text())
    rows, info = case(args, work)
    info["seconds"]["wall_only_this_case"] = time.perf_counter() - start
    results["rows"] = [r for r in results["rows"] if r.get("arch") != arch] + rows
    results[info_key] = info
    write_results(results, args, work)


GEMMA_CONTROL_ARCH = "gemma3-270m (llama.cpp's own quantizer)"
CONTROL_FTYPES = ("Q4_0", "Q8_0")


def gemma_control_rows(args, work: Path):
    """Control for the Gemma mix: the dense model exported as F32, quantized by llama.cpp's own
    `llama_model_quantize` (gguf_mix.py's worker, no imatrix) to CONTROL_FTYPES; each file run in llama.cpp and,
    dequantized, in qbara (qbara.load_model of the GGUF), both against qbara's dense logits and each other."""
    from collections import Counter

    from gguf import GGUFReader

    import qbara
    from qbara.export import export_gguf

    seconds = {}
    t = time.perf_counter()
    model, tokenizer = qbara.load_model("gemma3-270m")
    model = model.float().eval()
    eval_ids = gemma_text_ids(args, tokenizer)[-args.gemma_tokens:]
    dense = qbara_logits(model, eval_ids)
    f32 = work / "gemma3-270m-dense.F32.gguf"
    export_gguf(model, tokenizer, f32, dense_type="f32", embedding_type="f32", overwrite=True)
    del model
    seconds["qbara_dense_and_f32_export"] = time.perf_counter() - t
    files = {ftype: work / f"gemma3-270m-llamacpp-{ftype}.gguf" for ftype in CONTROL_FTYPES}
    job = {"quantize": [{"src": str(f32), "dst": str(dst), "ftype": ftype} for ftype, dst in files.items()],
           "windows": [], "threads": args.threads, "extra_bufts": args.extra_bufts,
           "result": str(work / "quantize_result.json")}
    (work / "quantize_job.json").write_text(json.dumps(job))
    t = time.perf_counter()
    subprocess.run(["nice", "-n", "10", args.llama_python, str(HERE.parent / "gguf_mix.py"), "--worker",
                    str(work / "quantize_job.json")], check=True)
    seconds["llama_cpp_quantize"] = time.perf_counter() - t
    info = {"eval_tokens": len(eval_ids), "ftypes": list(CONTROL_FTYPES), "seconds": seconds, "files": {}}
    runs = [{"name": "F32", "model": str(f32), "kv_f32": True}]
    runs += [{"name": ftype, "model": str(path)} for ftype, path in files.items()]
    t = time.perf_counter()
    logits, run_info, errors = guarded_llama(runs, eval_ids, args, work, n_ctx=128)
    seconds["llama_cpp_runs"] = {r["name"]: r["seconds"] for r in run_info}
    seconds["llama_cpp_total"] = time.perf_counter() - t
    rows = []

    def row(first, second, what, file, engines):
        rows.append({**compare("gemma3-270m", what, first, second, eval_ids, engines=engines),
                     "arch": GEMMA_CONTROL_ARCH, "file": file})

    for run in runs:
        name = run["name"]
        if name != "F32":
            reader = GGUFReader(run["model"])
            info["files"][name] = {"bytes": Path(run["model"]).stat().st_size,
                                   "types": dict(Counter(t.tensor_type.name for t in reader.tensors))}
            del reader
        t = time.perf_counter()
        ours, _ = qbara.load_model(run["model"])
        own = qbara_logits(ours.float().eval(), eval_ids)
        del ours
        seconds[f"qbara_forward_{name}"] = time.perf_counter() - t
        label = "F32 (dense export)" if name == "F32" else f"llama.cpp-quantized {name}"
        row(own, dense, f"{name}: qbara fwd of file vs qbara dense", f"{label}: qbara's forward of the file's "
            "dequantized weights vs qbara dense", ("qbara (file)", "qbara dense"))
        if name not in logits:
            rows.append({"case": "gemma3-270m", "arch": GEMMA_CONTROL_ARCH, "file": label, "error": errors[name]})
            continue
        row(logits[name], dense, f"{name}: llama.cpp vs qbara dense", f"{label}: llama.cpp vs qbara dense",
            ("llama.cpp", "qbara dense"))
        row(logits[name], own, f"{name}: llama.cpp vs qbara fwd of file", f"{label}: llama.cpp vs qbara's forward "
            "of the same file", ("llama.cpp", "qbara (file)"))
    return rows, info


def write_results(results: dict, args, work: Path) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_architectures_llamacpp.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gguf_architectures_llamacpp.md").write_text(markdown(results))
    print(f"wrote {out / 'gguf_architectures_llamacpp.json'} and .md; wall {results['seconds']['wall']:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def ggml_decode_sentence(check) -> str:
    if check is None:
        return ""
    if isinstance(check, str):
        return f"ggml decode check FAILED: {check}. "
    return (f"ggml's own dequantizer (`to_float` of libggml) on the file's {check['tensors']} quantized tensors: "
            f"{check['exact']} bit-identical to qbara's weights (max |Δw| {check['max_abs_diff']:.3g}). ")


def llama_version(args) -> str:
    out = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def markdown(results: dict) -> str:
    s, g = results["setup"], results["gemma3_270m"]
    lines = [
        "# qbara GGUF export of each architecture checked in llama.cpp",
        "",
        f"`bench/gguf_architectures_llamacpp.py`, llama-cpp-python {s['llama_cpp_python']} on CPU, {s['threads']} "
        f"threads, use_extra_bufts={s['llama_extra_bufts']}. llama.cpp evaluates the same token ids as qbara (no "
        "BOS); relative error = ‖Δ‖_F / ‖qbara‖_F over every position's logits; top-1 = share of positions whose "
        "argmax agrees.",
        "",
        f"- Tiny random models (the test suite's builders with 3 layers: hidden 64, 4 heads of 16, 2 KV heads, "
        f"intermediate 128, a 320-token byte-level BPE tokenizer with merges since llama.cpp refuses the tests' "
        f"merge-less byte tokenizer: `cannot find tokenizer merges in model file`), {s['tokens']} random token "
        "ids. **q4_1**: INT4 G32 + "
        "QA-HiRA (rank 4, random non-zero adapters) merged into the quantized base, every linear written as "
        "Q4_1, embedding F32. **mixed**: a gguf:* base, layer i in "
        f"{' / '.join(s['mixed_cycle'])} (i mod 3). **F32**: the same file with every tensor dequantized to F32 "
        "(gguf-py), run with an F32 KV cache: the control, plain fp32 arithmetic in llama.cpp. The quantized "
        "files run as shipped (F16 KV cache; llama.cpp quantizes activations to Q8_1 / Q8_0 for its quantized "
        "matmuls, which sets their error floor).",
    ]
    if g:
        lines.append(
            f"- **gemma3-270m**: `load_model(\"gemma3-270m\")`, INT4 G32 + QA-HiRA rank {g['rank']} (alpha "
            f"{g['alpha']}), {g['steps']} AdamW steps at lr {g['lr']:g}, each on the next {g['train_tokens']} tokens "
            "of Hamlet "
            f"(loss {g['losses'][0]:.3f} -> {g['losses'][-1]:.3f}), merged into the quantized base "
            f"(folding changed the logits by {g['fold_rel_change']:.1e} relative: fp16 rounding of the folded "
            f"minima), exported to Q4_1 with an F32 embedding ({g['export']['bytes'] / 1e6:.0f} MB; F32 copy "
            f"{g['export']['f32_bytes'] / 1e6:.0f} MB); logits on the last {g['eval_tokens']} tokens of a "
            "20000-character Hamlet passage.")
    m = results.get("gemma3_270m_mixed")
    if m:
        lines.append(
            "- **gemma3-270m (gguf:* mixed base)**: `load_model(\"gemma3-270m\")` untrained, each decoder linear "
            f"quantized with a GGML block format: layer i in {' / '.join(m['cycle'])} (i mod 3), except o_proj and "
            f"down_proj (input width 1024 / 2048, multiples of 256; the other linears' 640-wide rows fit no K-quant "
            f"block) in {' / '.join(m['k_cycle'])}; embedding F32 ({m['export']['bytes'] / 1e6:.0f} MB; F32 copy "
            f"{m['export']['f32_bytes'] / 1e6:.0f} MB; tensors by format {m['export']['formats']}); the same "
            f"{m['eval_tokens']} evaluation tokens as above. No training: a check of the quantized base alone. "
            + ggml_decode_sentence(m.get("ggml_decode")) +
            "The row marked \"no llama.cpp\" rounds each quantized linear's input in qbara as llama.cpp's CPU "
            "matmuls do (8-bit blocks: Q8_0 of 32 for the 32-blocks, Q8_K of 256 for the K-quants): this base "
            "amplifies that rounding alone to a logit change as large as llama.cpp's deviation, while the F32 "
            "copy (no activation rounding) agrees to 1e-3.")
    c = results.get("gemma3_270m_llamacpp_quantized")
    if c:
        lines.append(
            "- **gemma3-270m (llama.cpp's own quantizer)**: the control for the mixed base: "
            "`load_model(\"gemma3-270m\")`"
            " exported dense as F32 (`dense_type=\"f32\", embedding_type=\"f32\"`), quantized by llama.cpp's own "
            f"`llama_model_quantize` (no imatrix) to {' / '.join(c['ftypes'])} (tensor types "
            + "; ".join(f"{k}: {v['types']}" for k, v in c["files"].items()) + "); each file run in llama.cpp and, "
            "dequantized by `qbara.load_model(file.gguf)`, in qbara's fp32 forward, on the same "
            f"{c['eval_tokens']} tokens. \"llama.cpp vs qbara's forward of the same file\" isolates llama.cpp's own "
            "arithmetic (Q8 activation rounding) on weights both engines hold identically.")
    lines += ["", "NLL: mean next-token negative log-likelihood over the evaluated ids, first engine / second "
              "(llama.cpp / qbara unless the file column says otherwise).", "",
              "| architecture | file | rel. error | max abs Δlogit | top-1 agree | NLL |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['file']} | FAILED: {r['error']} | | | |")
        else:
            lines.append(f"| {r['arch']} | {r['file']} | {r['rel_error']:.2e} | {r['max_abs_diff']:.2e} | "
                         f"{r['top1_agree']:.3f} | {r['nll_first']:.4f} / {r['nll_second']:.4f} |")
    for label, case in (("Gemma 3 270M", g), ("Gemma 3 270M mixed base", m),
                        ("Gemma 3 270M, llama.cpp's own quantizer", results.get("gemma3_270m_llamacpp_quantized"))):
        if case:
            sec = case["seconds"]
            lines += ["", f"{label} wall times (s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in sec.items() if isinstance(v, float))
                + "; llama.cpp per file (load + eval): "
                + ", ".join(f"{k} {v:.1f}" for k, v in sec.get("llama_cpp_runs", {}).items()) + "."]
    if g:
        tok = g.get("tokenizer")
        lines += ["", "## Gemma tokenizer: llama.cpp's (`Llama.tokenize` on the exported GGUF) vs qbara's", ""]
        if isinstance(tok, str):
            lines.append(f"FAILED: {tok}")
        else:
            lines += ["| text | same ids | qbara | llama.cpp |", "|---|---|---|---|"]
            for t in tok:
                lines.append(f"| {json.dumps(t['text'], ensure_ascii=False)} | {t['same']} | {t['qbara']} | "
                             f"{t['llama_cpp'] if not t['same'] else ''} |")
    sec = results["seconds"]
    lines += ["", f"Wall time {sec['wall']:.0f} s (tiny models: qbara {sec['tiny_qbara']:.0f} s, llama.cpp "
                  f"{sec['tiny_llama_cpp']:.0f} s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--tokenize-worker":
        tokenize_worker(sys.argv[2])
    else:
        main()
