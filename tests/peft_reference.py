"""The independent reference for equivalence tests: one adapter trained alone with PEFT.

Full (unsplit) optimizer batches, torch AdamW, transformers' linear warmup schedule and
gradient clipping, starting from given adapter weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlora_core.plugin_api.conventions import IGNORE_INDEX

#: loss(model, input_ids, attention_mask, labels) -> token-mean loss over the batch.
LossFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def transformers_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss (token mean over the batch)."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train_alone_with_peft(
    base: Any, jc: Any, init_state: dict, samples: list, pad_id: int, loss_fn: LossFn = transformers_loss
) -> dict[str, torch.Tensor]:
    """Train job ``jc``'s adapter alone over ``base``; returns PEFT's adapter state dict."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    a, t = jc.adapter, jc.train
    lora = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=list(a.target_modules))
    model = get_peft_model(base, lora)
    assert not set_peft_model_state_dict(model, init_state).unexpected_keys
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    batches = [samples[i : i + t.batch_size] for i in range(0, len(samples), t.batch_size)][: t.max_steps]
    sched = get_linear_schedule_with_warmup(opt, t.warmup_steps, len(batches))
    model.train()
    device = params[0].device
    for rows in batches:
        width = max(len(s) for s in rows)
        ids = torch.tensor([list(s.input_ids) + [pad_id] * (width - len(s)) for s in rows], device=device)
        labels = torch.tensor([list(s.labels) + [IGNORE_INDEX] * (width - len(s)) for s in rows], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in rows], device=device)
        loss_fn(model, ids, mask, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def reference_base(model_dir: Path, quantize: str | None):
    """The base model as transformers loads it (its own class for the checkpoint's family),
    quantized by transformers' own bitsandbytes path."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if quantize == "int8":
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )
    for module in model.modules():  # the CPU repacking trap of FACTS.md
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
