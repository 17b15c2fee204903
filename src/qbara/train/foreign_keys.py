"""Keys of other fine-tuning tools' configs that qbara does not take, each with why and what to write instead.

The keys that do have a qbara equivalent are aliases (`qbara.train.config.ALIASES`) and simply work; the ones
here are refused by name, so a config carried over from bitsandbytes / Hugging Face, PEFT, Axolotl or
LLaMA-Factory gets the right advice instead of a guess at a similar-looking qbara key.
"""
from __future__ import annotations

_DATA_FILE = "qbara reads one records file: set data.train (and data.eval) to a .jsonl/.json/.csv/.txt path"
_FROZEN = "qbara trains only the adapters, the base stays frozen (quantized); remove it"
_NOT_NEEDED = "not needed: remove it"

# key -> (the tool it comes from, why it is not supported / what to do instead)
UNSUPPORTED = {
    # bitsandbytes / transformers' BitsAndBytesConfig
    "load_in_4bit": ("bitsandbytes", "qbara always quantizes the base: set quant.format nf4 (the default) or another "
                                     "4-bit format (int4, gguf:q4_k)"),
    "load_in_8bit": ("bitsandbytes", "qbara always quantizes the base: set quant.format nf8 or int8"),
    "bnb_4bit_compute_dtype": ("bitsandbytes", "qbara dequantizes each weight to its input's dtype: fp32, or "
                                               "bfloat16 under train.bf16 true"),
    "bnb_4bit_quant_storage": ("bitsandbytes", "qbara packs its own codes (a fixed layout per quant.format); "
                                               "remove it"),
    "llm_int8_threshold": ("bitsandbytes", "qbara has no LLM.int8 outlier path: use quant.format int8 or nf8"),
    "llm_int8_skip_modules": ("bitsandbytes", "qbara quantizes the layers adapter.target_modules names; remove it"),
    "quantization_config": ("transformers", "write a quant section instead, e.g. quant: {format: nf4, "
                                            "double_quant: true}"),
    # PEFT LoraConfig
    "use_dora": ("PEFT", "qbara has no DoRA: its methods are lora, qalora, qbara and qahira (adapter.method)"),
    "use_rslora": ("PEFT", "qbara scales every adapter by alpha / rank; rsLoRA's alpha / sqrt(rank) is "
                           "adapter.alpha = lora_alpha * sqrt(rank)"),
    "modules_to_save": ("PEFT", _FROZEN),
    "bias": ("PEFT", "adapters have no bias terms and the base's biases stay frozen; remove it"),
    "task_type": ("PEFT", "qbara fine-tunes causal language models only; remove it"),
    "init_lora_weights": ("PEFT", "set adapter.init: default (B = 0, as PEFT's true), loftq or lq"),
    "fan_in_fan_out": ("PEFT", "qbara reads each layer's orientation itself; remove it"),
    "layers_to_transform": ("PEFT", "list the module names in adapter.target_modules instead"),
    "rank_pattern": ("PEFT", "one adapter.rank for all layers (qahira sizes its layers itself); remove it"),
    "alpha_pattern": ("PEFT", "one adapter.alpha for all layers; remove it"),
    "peft_type": ("PEFT", "set adapter.method: lora, qalora, qbara or qahira"),
    # Axolotl
    "datasets": ("Axolotl", _DATA_FILE + "; data.format picks instruction, chat or text"),
    "test_datasets": ("Axolotl", _DATA_FILE),
    "dataset_prepared_path": ("Axolotl", "qbara tokenizes the records at the start of each run; remove it"),
    "sample_packing": ("Axolotl", "qbara pads each batch to its longest example (text records are packed "
                                  "always); remove it"),
    "eval_sample_packing": ("Axolotl", "qbara does not pack instruction or chat records; remove it"),
    "pad_to_sequence_len": ("Axolotl", "qbara pads each batch to its longest example; remove it"),
    "flash_attention": ("Axolotl", "qbara uses transformers' default attention for the model; remove it"),
    "xformers_attention": ("Axolotl", "qbara uses transformers' default attention for the model; remove it"),
    "lora_target_linear": ("Axolotl", "qbara targets all linear layers by default (adapter.target_modules: "
                                      "all-linear); remove it"),
    "train_on_inputs": ("Axolotl", "qbara trains on the answer tokens of instruction / chat records and on every "
                                   "token of text records; remove it"),
    "evals_per_epoch": ("Axolotl", "set train.eval_steps (evaluate every N steps)"),
    "saves_per_epoch": ("Axolotl", "set train.save_steps (checkpoint every N steps)"),
    "special_tokens": ("Axolotl", "qbara keeps the model's tokenizer as it is; remove it"),
    "deepspeed": ("Axolotl", "qbara has no DeepSpeed; run on several GPUs with torchrun (DDP, or train.fsdp: "
                             "full_shard to shard the base)"),
    "fp16": ("Axolotl", "qbara trains in fp32 or bfloat16 mixed precision: set train.bf16 true, or remove it"),
    "tf32": ("Axolotl", _NOT_NEEDED),
    "strict": ("Axolotl", _NOT_NEEDED),
    "model_type": ("Axolotl", "qbara reads the model class from model.name; remove it"),
    "tokenizer_type": ("Axolotl", "qbara loads the tokenizer saved with model.name; remove it"),
    "base_model_config": ("Axolotl", "qbara reads the config saved with model.name; remove it"),
    "wandb_project": ("Axolotl", "set train.report_to wandb and the WANDB_PROJECT environment variable"),
    # LLaMA-Factory
    "dataset": ("LLaMA-Factory", _DATA_FILE + " (no dataset_info.json names)"),
    "eval_dataset": ("LLaMA-Factory", _DATA_FILE),
    "dataset_dir": ("LLaMA-Factory", _DATA_FILE),
    "quantization_bit": ("LLaMA-Factory", "set quant.format instead: nf4 (QLoRA's), int4, nf8 or int8"),
    "quantization_method": ("LLaMA-Factory", "qbara quantizes the base itself: set quant.format (nf4, int4, "
                                             "gguf:q4_k, ...)"),
    "lora_target": ("LLaMA-Factory", "write adapter.target_modules: all-linear (LLaMA-Factory's all) or a list "
                                     "[q_proj, v_proj]"),
    "additional_target": ("LLaMA-Factory", _FROZEN),
    "stage": ("LLaMA-Factory", "qbara trains supervised fine-tuning (sft) only; remove it"),
    "do_train": ("LLaMA-Factory", "qbara train always trains; remove it"),
    "plot_loss": ("LLaMA-Factory", "qbara always writes loss_curve.png to train.output_dir; remove it"),
    "pissa_init": ("LLaMA-Factory", "qbara has no PiSSA: adapter.init loftq or lq also start from a "
                                    "decomposition of the weights"),
    "per_device_eval_batch_size": ("transformers", "eval runs with train.batch_size; remove it"),
}


def unsupported_message(key: str) -> str | None:
    """The one-line refusal for a foreign key `key` (bare or under a section), or None when it is not one."""
    name = key.rpartition(".")[2]
    if name not in UNSUPPORTED:
        return None
    tool, why = UNSUPPORTED[name]
    return f"config key {key!r} ({tool}) is not supported: {why}"
