"""Write the files one qbara version produces (tiny random model) and what that version reads back from them, so a
later version can prove it still loads them bit for bit (tests/test_compat_fixtures.py).

    python scripts/make_compat_fixtures.py tests/fixtures/compat-0.1.0

Artifacts: an adapter folder per method (Python API), a native quantized folder mixing formats, a `qbara train`
run (adapter + checkpoint), its `qbara merge --into quantized` folder and `qbara export` GGUF, and a `qbara lq`
output. `expected.safetensors` holds, per artifact, the logits on fixed token ids of the model loaded back by the
version that wrote it; `expected.json` a digest of every loaded tensor and buffer.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import qbara
from qbara import AdapterConfig, QuantConfig
from qbara.models import load_model
from qbara.native import save_quantized

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 64, 12, 5, 88, 31]])
METHODS = {  # method -> (quant, adapter options)
    "lora": (QuantConfig("nf4"), {}),
    "qalora": (QuantConfig("int4", block_size=32), {}),
    "qbara": (QuantConfig("nf4"), {"pool": 2}),
    "qahira": (QuantConfig("int4", block_size=32), {"pool_in": 32, "pool_out": 2}),
}
MIXED = {"q_proj": QuantConfig("nf4"), "k_proj": QuantConfig("int4", block_size=32),
         "v_proj": QuantConfig("gguf:q4_0"), "o_proj": QuantConfig("nf3", block_size=32, dq_bits=4),
         "gate_proj": QuantConfig("int5", block_size=32, minimum_dtype="fp32"), "up_proj": QuantConfig("gguf:q8_0"),
         "down_proj": QuantConfig("nf4", dq_style="bnb")}


def randomize_adapters(model, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def digest(model) -> str:
    """sha256 over every parameter, buffer and packed quantized buffer, in name order."""
    h = hashlib.sha256()
    items = dict(model.state_dict())
    for name, module in model.named_modules():
        qweight = getattr(module, "qweight", None)
        if qweight is not None and hasattr(qweight, "tensors"):
            h.update(json.dumps([name, qweight.config.to_dict()], sort_keys=True).encode())
            items.update({f"{name}.qweight.{k}": v for k, v in qweight.tensors.items()})
    for name in sorted(items):
        t = items[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS).logits.float().contiguous()


def qbara_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qbara", *args], check=True, stdout=subprocess.DEVNULL)


def write_records(path: Path) -> None:
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_adapter_onto(quant, name: str):
    def load(folder: Path):
        base, _ = load_model("tiny-llama")
        qbara.prepare(base, quant)
        return qbara.load_adapter(base, folder / name)
    return load


def load_adapter_on_native(folder: Path):
    native, _ = load_model(str(folder / "native-mixed"))
    return qbara.load_adapter(native, folder / "adapter-on-native-mixed")


# artifact -> how a user loads it back (the same calls for the version that wrote it and every later one)
LOADERS = {
    **{f"adapter-{m}": load_adapter_onto(quant, f"adapter-{m}") for m, (quant, _) in METHODS.items()},
    "native-mixed": lambda folder: load_model(str(folder / "native-mixed"))[0],
    "adapter-on-native-mixed": load_adapter_on_native,
    "run-qahira": lambda folder: qbara.from_pretrained("tiny-llama", adapter=str(folder / "run-qahira" / "adapter"))[0],
    "merged-qahira": lambda folder: load_model(str(folder / "merged-qahira"))[0],
    "merged-qahira.gguf": lambda folder: load_model(str(folder / "merged-qahira.gguf"))[0],
    "lq": lambda folder: qbara.from_pretrained(str(folder / "lq" / "model"), adapter=str(folder / "lq" / "adapter"))[0],
}


def write_artifacts(out: Path) -> None:
    for method, (quant, options) in METHODS.items():
        model, _ = load_model("tiny-llama")
        qbara.prepare(model, quant, AdapterConfig(method=method, rank=4, **options))
        randomize_adapters(model, seed=len(method))
        qbara.save_adapter(model, out / f"adapter-{method}")

    model, tokenizer = load_model("tiny-llama")
    per_layer = {name: MIXED[name.rsplit(".", 1)[-1]] for name, module in model.named_modules()
                 if name.rsplit(".", 1)[-1] in MIXED}
    qbara.prepare(model, per_layer)
    save_quantized(model, tokenizer, out / "native-mixed")
    model, _ = load_model(str(out / "native-mixed"))
    qbara.prepare(model, per_layer, AdapterConfig(method="lora", rank=4))
    randomize_adapters(model, seed=7)
    qbara.save_adapter(model, out / "adapter-on-native-mixed")

    data = out / "records.jsonl"
    write_records(data)
    run = out / "run-qahira"
    qbara_cli("train", "--model.name", "tiny-llama", "--quant.format", "int4", "--quant.block_size", "32",
              "--adapter.method", "qahira", "--adapter.rank", "4", "--data.train", str(data),
              "--train.output_dir", str(run), "--train.steps", "3", "--train.save_steps", "10",
              "--train.batch_size", "2", "--train.lr", "1e-2", "--train.progress", "false")
    data.unlink()
    qbara_cli("merge", "--model", "tiny-llama", "--adapter", str(run / "adapter"), "--into", "quantized",
              "--out", str(out / "merged-qahira"))
    qbara_cli("export", "--model", str(out / "merged-qahira"), "--out", str(out / "merged-qahira.gguf"))
    qbara_cli("lq", "--model", "tiny-llama", "--budget", "4.25", "--rank", "4", "--configs", "qlora",
              "--out", str(out / "lq"))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    write_artifacts(out)
    expected, digests = {}, {}
    for name, load in LOADERS.items():
        model = load(out)
        expected[name], digests[name] = logits(model), digest(model)
    save_file(expected, str(out / "expected.safetensors"))
    (out / "expected.json").write_text(json.dumps({"qbara": qbara.__version__, "ids": IDS.tolist(),
                                                   "digests": digests}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
