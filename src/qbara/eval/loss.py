"""Held-out loss of instruction or chat records: mean NLL on the answer tokens only."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from qbara.errors import QbaraError
from qbara.eval.perplexity import model_device
from qbara.train.data import IGNORE_INDEX, PadCollator


@torch.no_grad()
def masked_loss(model, examples, batch_size: int = 4, progress: bool = False) -> dict:
    """Token-weighted mean NLL on the answer tokens of `examples` (`qbara.train.data.Example`s):
    {"loss", "tokens", "records"}."""
    collate, device = PadCollator(0), model_device(model)
    total, count = 0.0, 0
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="eval loss", disable=not progress, leave=False):
            inputs = {k: v.to(device) for k, v in collate([{"input_ids": e.input_ids, "labels": e.labels}
                                                           for e in batch]).items()}
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
            labels = inputs["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    finally:  # a forward that raises (out of memory, an interrupt) leaves the model in the mode it was given in
        model.train(was_training)
    if not count:
        raise QbaraError("no answer tokens to score: every label is masked (or there are no examples); check the "
                         "held-out records")
    return {"loss": total / count, "tokens": count, "records": len(examples)}
