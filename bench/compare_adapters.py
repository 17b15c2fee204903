"""Train every adapter method for the same steps, data order and seed at (about) equal trainable
parameters on SmolLM2, and print the losses side by side.

LoRA and Q-BaRA sit on NF4 (QLoRA's base); QA-LoRA and QA-HiRA on INT4 with groups of 32 (the base
they fold into). QA-LoRA's rank is raised so its parameter count matches LoRA's; QA-HiRA's output
repetition is chosen per layer for the same purpose. Language modelling on Shakespeare: train on
chunks of one play, report the held-out loss on its last tenth.

    python bench/compare_adapters.py [--steps 30] [--rank 8] [--lr 5e-4] [--play hamlet]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.adapters import adapter_layers, trainable_parameter_count
from qbara.data import shakespeare_text
from qbara.models import load_model


def chunks(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = ids.numel() // seq
    return ids[: n * seq].view(n, seq)


@torch.no_grad()
def mean_loss(model, data: torch.Tensor, batch: int) -> float:
    losses = [model(x, labels=x).loss.item() for x in data.split(batch)]
    return sum(losses) / len(losses)


def qalora_rank_matching_lora(model, rank: int, group: int) -> int:
    """QA-LoRA rank whose total parameter count is closest to LoRA's at `rank`."""
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    lora = sum(rank * (m.in_features + m.out_features) for m in linears)
    per_rank = sum(m.in_features // group + m.out_features for m in linears)
    return max(1, round(lora / per_rank))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--held-out", type=int, default=16, help="held-out chunks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base, tokenizer = load_model(args.model)
    ids = tokenizer(shakespeare_text(args.play), add_special_tokens=False, return_tensors="pt").input_ids[0]
    data = chunks(ids, args.seq)
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:cut + args.held_out]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    nf4, int4 = QuantConfig("nf4"), QuantConfig("int4", block_size=32)
    r_qalora = qalora_rank_matching_lora(base, args.rank, 32)
    runs = {
        f"lora r{args.rank} (nf4)": (nf4, AdapterConfig("lora", rank=args.rank, alpha=args.alpha)),
        f"qbara r{args.rank} l2 (nf4)": (nf4, AdapterConfig("qbara", rank=args.rank, alpha=args.alpha, pool=2)),
        f"qalora r{r_qalora} (int4)": (int4, AdapterConfig("qalora", rank=r_qalora, alpha=args.alpha * r_qalora / args.rank)),
        f"qahira ~r{args.rank} (int4)": (int4, AdapterConfig("qahira", rank=args.rank, alpha=args.alpha)),
    }
    log_every = max(1, args.steps // 5)
    results = {}
    for name, (quant, adapter) in runs.items():
        torch.manual_seed(args.seed)
        model = prepare(copy.deepcopy(base), quant, adapter)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        before = mean_loss(model, held, args.batch)
        curve, start = [], time.perf_counter()
        for step in range(args.steps):
            idx = order[(torch.arange(args.batch) + step * args.batch) % len(order)]
            x = train[idx]
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % log_every == 0 or step == args.steps - 1:
                curve.append((step, loss.item()))
        results[name] = dict(params=trainable_parameter_count(model), before=before,
                             after=mean_loss(model, held, args.batch), curve=curve,
                             step_s=(time.perf_counter() - start) / args.steps, layers=len(adapter_layers(model)))
        print(f"{name}: done, {results[name]['step_s']:.2f} s/step", flush=True)
        del model, opt
    print(f"\nmodel {args.model}; {args.steps} steps, batch {args.batch} x {args.seq} tokens of {args.play}, "
          f"AdamW lr {args.lr}, seed {args.seed}; held-out: {len(held)} chunks")
    print(f"{'method':<26}{'trainable':>11}{'held before':>13}{'held after':>12}{'ppl after':>11}{'s/step':>8}  train loss")
    for name, r in results.items():
        curve = " ".join(f"{loss:.3f}" for _, loss in r["curve"])
        print(f"{name:<26}{r['params']:>11,}{r['before']:>13.4f}{r['after']:>12.4f}{math.exp(r['after']):>11.3f}"
              f"{r['step_s']:>8.2f}  {curve}")


if __name__ == "__main__":
    main()
