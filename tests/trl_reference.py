"""The independent reference for preference objectives: TRL's own trainers' loss on one batch.

:func:`trl_loss_and_grads` builds TRL's ``DPOTrainer``, ``CPOTrainer`` or ``ORPOTrainer`` over a
tiny checkpoint with a PEFT LoRA adapter, hands it one batch of *exact token ids* and returns
the trainer's loss, the metrics it logs for that batch, and the gradients of the LoRA weights
after ``loss.backward()``. TRL is a test dependency only.

Written against TRL 1.16.0 (transformers 5.24, PEFT 0.21); its tests also pass with TRL 1.0.0,
hence ``trl>=1.0`` in the ``test`` extra. Where the trainers live:

* DPO: ``trl.DPOTrainer`` / ``trl.DPOConfig`` (``trl/trainer/dpo_trainer.py``, ``_compute_loss``).
* CPO: ``trl.experimental.cpo.CPOTrainer`` / ``CPOConfig`` (``get_batch_loss_metrics``).
* ORPO: ``trl.experimental.orpo.ORPOTrainer`` / ``ORPOConfig`` (``get_batch_loss_metrics``).

How TRL feeds the batch (and how we make it use our ids). Each trainer tokenizes strings when
it is built; it has no way to take token ids at construction. We therefore build it over a
one-row placeholder dataset, then write the batch rows in exactly the format the trainer's
tokenization produces (:func:`preference_rows`) and pad them with the trainer's own
``data_collator``, then call the trainer's own ``compute_loss``. So TRL adds no BOS/EOS (its
DPO appends an EOS *string* to text completions, its CPO/ORPO ``tokenize_row`` prepend BOS to
the prompt and append EOS to the answers; none of that runs on our rows) and truncates nothing
(DPO's collator gets ``max_length=None``; CPO/ORPO truncate only in ``tokenize_row``).
``tests/core/test_trl_reference.py`` checks that our rows equal the ones TRL's own
tokenization builds for text whose ids we know.

Everything that could make TRL differ from the plain formula is set to the plain choice:
fp32 weights (``dtype=torch.float32``), ``bf16=False``/``fp16=False`` (TRL configs default
``bf16=True``), no activation (gradient) checkpointing (TRL default on), LoRA dropout 0 and
``disable_dropout=True``, no liger kernel, no padding-free, DPO ``loss_type=["sigmoid"]``,
``precompute_ref_log_probs=False``, ``use_weighting=False``, ``ld_alpha=None``,
``f_divergence_type="reverse_kl"``, ``pad_to_multiple_of=None``, no ``sync_ref_model``, no RPO
(TRL 1.16 has no ``rpo_alpha``: RPO is ``loss_type=["sigmoid", "sft"]``), CPO
``loss_type="sigmoid"`` and ``alpha=0`` (no AlphaPO), one batch, no gradient accumulation.
The adapter is made by the trainer from ``peft_config`` and then loaded with ``init_state``,
so DPO's reference is the base with the adapter disabled (had we passed a ready PeftModel,
TRL 1.16 would copy the starting adapter into a frozen "ref" adapter instead).

How TRL 1.16 computes each loss. Notation: per pair ``i``, ``lc_i``/``lr_i`` = log-prob of the
chosen/rejected completion given the prompt under the policy, ``rc_i``/``rr_i`` under the
reference; "token" = a completion token (prompt and padding excluded) unless said otherwise.

DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7)
    ``lc, lr, rc, rr`` are *sums* over completion tokens (no averaging).
    ``d_i = (lc_i - rc_i) - (lr_i - rr_i)``; ``loss = mean_i -logsigmoid(beta * d_i)``.
    Label smoothing: TRL 1.16's ``"sigmoid"`` loss *ignores* ``label_smoothing`` (it is used
    only by ``"robust"`` and ``"exo_pair"``); conservative DPO (cDPO),
    ``(1-ls) * -logsigmoid(beta d) + ls * -logsigmoid(-beta d)``, is no longer a TRL loss.
    For ``ls > 0`` we get it from TRL's own terms through ``loss_type=["sigmoid", "robust"]``
    with ``loss_weights=[2(1-ls), -(1-2ls)]``: robust = ``(-(1-ls) logsig(bd) + ls logsig(-bd))
    / (1-2ls)`` and logsig(-x) = logsig(x) - x give ``2(1-ls) sigmoid - (1-2ls) robust =
    -logsig(bd) + ls*bd = cDPO`` (so ``0 <= ls < 0.5``).
    Logits: TRL 1.16 never builds them; a fused LM head returns per-token log-probs.
    Metrics (each one value per batch, ``mean`` over the pairs unless said):
    ``rewards/chosen`` = mean ``beta (lc - rc)``, ``rewards/rejected`` = mean ``beta (lr - rr)``,
    ``rewards/accuracies`` = mean of ``[reward_c > reward_r]`` (strict), ``rewards/margins``
    = mean ``(reward_c - reward_r)``, ``logps/chosen``/``logps/rejected`` = mean summed
    ``lc``/``lr``, ``logits/chosen``/``logits/rejected`` = the vocabulary-mean logit at each
    chosen/rejected completion token, averaged over all those tokens of the batch (a token
    mean, not a pair mean), ``mean_token_accuracy`` = fraction of chosen completion tokens that
    are the argmax, ``entropy`` = mean entropy over all completion tokens (chosen and
    rejected), ``num_tokens`` = attended tokens of the batch (prompt + completion, both halves,
    cumulative over the trainer's life: here one batch).

CPO (Xu et al. 2024, arXiv:2401.08417, Eq. 3 and the NLL term)
    No reference model. ``lc``, ``lr`` are *sums* (``average_log_prob`` only for ipo/simpo).
    ``loss = mean_i[(1-ls) * -logsig(beta (lc_i - lr_i)) + ls * -logsig(-beta (lc_i - lr_i))]
    + cpo_alpha * NLL`` where NLL = ``nn.CrossEntropyLoss()`` (mean) over every chosen
    completion token of the batch: a *token mean pooled over the chosen completions of the
    batch* (not the mean of per-sequence means, not the paper's per-sequence sum
    ``-log pi(y_w|x)``); the EOS counts, the prompt does not. ``cpo_alpha=0`` skips it.
    Metrics: ``rewards/chosen`` = mean ``beta lc``, ``rewards/rejected`` = mean ``beta lr``,
    ``rewards/accuracies``, ``rewards/margins`` as DPO, ``logps/chosen``/``logps/rejected``
    = mean summed logps, ``nll_loss`` = the NLL above (unweighted), ``logits/chosen``/
    ``logits/rejected`` = ``logits.mean()`` over the whole padded chosen/rejected logits tensor
    ``[B, T, V]``, prompt and padding positions included (so it depends on the padded width
    ``T`` = the longest prompt+completion over both halves; not a quantity to match).

ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7)
    ``beta`` is the paper's lambda. ``lc``, ``lr`` are *per-token means* over the completion
    (``average_log_prob=True``). ``log_odds_i = (lc_i - lr_i) - (log1mexp(lc_i) -
    log1mexp(lr_i))``, log1mexp(x) = log(1 - e^x). ``loss = NLL - beta * mean_i
    logsig(log_odds_i)``. NLL = ``nn.CrossEntropyLoss()`` (mean) over the chosen sequences'
    *prompt and completion* tokens (every attended token but each row's first; TRL: "orpo
    chosen nll loss is computed over the full prompt and response"), pooled over the chosen
    half of the batch. Metrics: ``rewards/chosen`` = mean ``beta lc`` and ``rewards/rejected``
    = mean ``beta lr`` (with the averaged logps), ``rewards/accuracies``, ``rewards/margins``
    as above, ``logps/chosen``/``logps/rejected`` = mean averaged logps, ``nll_loss``,
    ``log_odds_ratio`` = mean ``logsig(log_odds)`` (the name notwithstanding),
    ``log_odds_chosen`` = mean ``log_odds``, ``logits/chosen``/``logits/rejected`` =
    ``logits[:, :-1].mean()`` over the padded tensor as in CPO.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

OBJECTIVES = ("dpo", "cpo", "orpo")

#: One preference pair: (prompt ids, chosen completion ids incl. EOS, rejected completion ids incl. EOS).
Pair = tuple[list[int], list[int], list[int]]

#: The constructor needs a dataset to tokenize; the batch itself never comes from it.
_PLACEHOLDER = {"prompt": ["p"], "chosen": [" c"], "rejected": [" r"]}


def trl_loss_and_grads(
    model_dir: Path,
    objective: str,
    pairs: list[Pair],
    lora: dict[str, Any],
    init_state: dict[str, torch.Tensor],
    beta: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """TRL's loss, logged metrics and LoRA gradients for ``pairs`` as one batch.

    Args:
        model_dir: a transformers causal-LM checkpoint with its tokenizer (pad token set).
        objective: ``"dpo"``, ``"cpo"`` or ``"orpo"``.
        pairs: (prompt, chosen, rejected) token ids, used as they are (no BOS/EOS added).
        lora: PEFT ``LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``); dropout must be 0.
        init_state: the starting adapter, keyed as ``get_peft_model_state_dict`` names it (every key).
        beta: DPO/CPO temperature; ORPO's lambda.
        label_smoothing: DPO (cDPO, see the module docstring) and CPO; ignored by ORPO.
        cpo_alpha: CPO's weight on the chosen NLL term.

    Returns:
        ``(loss, metrics, grads)``: the trainer's loss for the batch, the metrics it logs for it
        (names as TRL logs them), and each LoRA weight's gradient keyed like ``init_state``.

    Raises:
        ValueError: an unknown objective, LoRA dropout, label smoothing outside [0, 0.5) for
            DPO, or ``init_state`` not naming exactly the adapter's weights.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(objective, model, tokenizer, lora, beta, label_smoothing, cpo_alpha, out)
        peft_model = trainer.model
        expected = set(get_peft_model_state_dict(peft_model))
        if set(init_state) != expected:
            raise ValueError(f"init_state keys differ from the adapter's: {sorted(set(init_state) ^ expected)}")
        assert not set_peft_model_state_dict(peft_model, init_state).unexpected_keys
        batch = collate(trainer, preference_rows(objective, pairs))
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(peft_model, batch)
        loss.backward()
        return loss.item(), logged_metrics(trainer), lora_grads(peft_model)


def build_trainer(
    objective: str,
    model: Any,
    tokenizer: Any,
    lora: dict[str, Any],
    beta: float,
    label_smoothing: float,
    cpo_alpha: float,
    output_dir: str,
    train_dataset: Any = None,
) -> Any:
    """TRL's trainer for ``objective`` over ``model``, with the plain settings of the module docstring.

    ``train_dataset`` (text ``prompt``/``chosen``/``rejected``) is only tokenized by the
    constructor; it defaults to a one-row placeholder, since the harness's batch never comes
    from it.
    """
    from dataclasses import fields

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainingArguments

    settings = {"lora_dropout": 0.0, **lora}
    if settings["lora_dropout"] != 0.0:
        raise ValueError("the reference runs with LoRA dropout 0 (dropout makes losses incomparable)")
    peft_config = LoraConfig(task_type="CAUSAL_LM", **settings)
    common = {
        "output_dir": output_dir,
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        _checkpointing_field(fields(TrainingArguments)): False,
        "disable_dropout": True,
        "use_liger_kernel": False,
        "per_device_train_batch_size": 1,
        "remove_unused_columns": False,
        "beta": beta,
    }
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **common,
            **_dpo_loss_types(label_smoothing),
            label_smoothing=label_smoothing,
            max_length=None,
            padding_free=False,
            pad_to_multiple_of=None,
            precompute_ref_log_probs=False,
            use_weighting=False,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            sync_ref_model=False,
        )
        trainer_cls = DPOTrainer
    elif objective == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, loss_type="sigmoid", label_smoothing=label_smoothing, cpo_alpha=cpo_alpha, alpha=0.0)
        trainer_cls = CPOTrainer
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common)
        trainer_cls = ORPOTrainer
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(_PLACEHOLDER) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _checkpointing_field(arg_fields: Any) -> str:
    """transformers 5 renamed ``gradient_checkpointing`` (TRL's default: True) to ``activation_checkpointing``."""
    names = {f.name for f in arg_fields}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _dpo_loss_types(label_smoothing: float) -> dict[str, Any]:
    """DPOConfig loss settings: plain sigmoid, or cDPO composed from TRL's sigmoid and robust terms."""
    if label_smoothing == 0.0:
        return {"loss_type": ["sigmoid"], "loss_weights": None}
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(
            f"DPO label smoothing must lie in [0, 0.5) (cDPO from TRL's robust loss), got {label_smoothing}"
        )
    return {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - label_smoothing), -(1 - 2 * label_smoothing)]}


def preference_rows(objective: str, pairs: list[Pair]) -> list[dict[str, list[int]]]:
    """``pairs`` in the format the trainer's dataset tokenization produces, ids unchanged.

    DPO (``DPOTrainer._prepare_dataset``): ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
    CPO/ORPO (``tokenize_row``): ``prompt_input_ids``/``prompt_attention_mask`` and, for
    ``chosen`` and ``rejected``, ``*_input_ids`` = prompt + completion, ``*_attention_mask`` all
    ones, ``*_labels`` = -100 over the prompt then the completion ids.
    """
    if objective == "dpo":
        return [{"prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(r)} for p, c, r in pairs]
    rows = []
    for prompt, chosen, rejected in pairs:
        row = {"prompt_input_ids": list(prompt), "prompt_attention_mask": [1] * len(prompt)}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            ids = list(prompt) + list(completion)
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(prompt) + list(completion)
        rows.append(row)
    return rows


def collate(trainer: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad ``rows`` with the trainer's own data collator and move the tensors to its device."""
    batch = trainer.data_collator(rows)
    device = trainer.accelerator.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def logged_metrics(trainer: Any) -> dict[str, float]:
    """The metrics the trainer stored for the batch, averaged as its ``log`` averages them.

    DPO keeps them in ``_metrics["train"]``, CPO/ORPO in ``_stored_metrics["train"]``; one
    batch means one value each.
    """
    store = trainer._metrics["train"] if hasattr(trainer, "_metrics") else trainer._stored_metrics["train"]
    return {name: float(sum(values) / len(values)) for name, values in store.items()}


def lora_grads(peft_model: Any) -> dict[str, torch.Tensor]:
    """Each trainable LoRA weight's gradient, keyed as ``get_peft_model_state_dict`` names it."""
    adapter = f".{peft_model.active_adapter}."
    return {
        name.replace(adapter, "."): param.grad.detach().cpu().clone()
        for name, param in peft_model.named_parameters()
        if param.requires_grad
    }
