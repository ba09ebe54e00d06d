"""The TRL reference harness (tests/trl_reference.py) is right: its loss, metrics and LoRA
gradients equal the papers' formulas computed here, independently of TRL.

The formulas use per-token log-probabilities computed here with a PEFT model, one sequence at
a time (no padding), and autograd for the gradients:

* DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. 7, with conservative-DPO label smoothing:
  ``(1-ls) * -logsig(beta d) + ls * -logsig(-beta d)``, ``d = (lc - rc) - (lr - rr)``, summed
  log-probs, reference = the base (adapter disabled), batch mean.
* CPO, Xu et al. 2024 (arXiv:2401.08417) Eq. 3 plus ``cpo_alpha`` times the NLL of the chosen
  completions. The paper writes the NLL as ``-log pi(y_w|x)``; TRL takes the token mean over
  all chosen completion tokens of the batch, and so do we (the normalisation is what mlora
  must match).
* ORPO, Hong et al. 2024 (arXiv:2403.07691) Eqs. 4-7: per-token mean log-probs, ``loss = NLL
  - lambda * mean logsig(log odds ratio)``; the NLL, as TRL computes it, is the token mean over
  the chosen sequences' prompt and completion tokens (all but the first token of each).

Tolerance (fp32): 1e-5 absolute on loss, metrics and every gradient element (the issue's
bound); measured on this machine (TRL 1.16.0): losses 3e-7, metrics 2e-6 (summed log-probs near
-20, so fp32 rounding), gradients 5e-8 (largest gradient element about 0.1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trl_reference import build_trainer, collate, preference_rows, trl_loss_and_grads

pytest.importorskip("trl", reason="TRL is the test-only reference (pip install -e '.[test]')")

ATOL = 1e-5
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
BOS, EOS = 0, 1  # the tiny tokenizer's <s>, </s>

#: Varied lengths, so both halves of the batch are padded and rejected is sometimes longer.
PAIRS = [
    ([BOS, 40, 41, 42, 43], [50, 51, EOS], [60, EOS]),
    ([BOS, 44], [52, EOS], [61, 62, 63, 64, EOS]),
    ([BOS, 45, 46, 47], [53, 54, 55, 56, EOS], [65, 66, EOS]),
]


def peft_model(model_dir: Path, init_state: dict[str, torch.Tensor]):
    """The tiny base in fp32 with the LoRA adapter set to ``init_state`` (PEFT, not TRL)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **LORA))
    if init_state:
        assert not set_peft_model_state_dict(model, init_state).unexpected_keys
    return model


@pytest.fixture(scope="module")
def init_state(tiny_llama_dir: Path) -> dict[str, torch.Tensor]:
    """Non-zero LoRA A and B, so the policy differs from the base (DPO's reference)."""
    from peft import get_peft_model_state_dict

    shapes = get_peft_model_state_dict(peft_model(tiny_llama_dir, {}))
    g = torch.Generator().manual_seed(0)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in shapes.items()}


def token_logps(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..len-1, one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def completion_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Per-token log-probs of ``completion`` given ``prompt``."""
    return token_logps(model, prompt + completion)[len(prompt) - 1 :]


def smoothed_sigmoid_loss(x: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    return (-(1 - ls) * F.logsigmoid(beta * x) - ls * F.logsigmoid(-beta * x)).mean()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }


def paper_dpo(model, beta: float, ls: float, cpo_alpha: float):
    pol = [[completion_logps(model, p, c).sum(), completion_logps(model, p, r).sum()] for p, c, r in PAIRS]
    with torch.no_grad(), model.disable_adapter():
        ref = [[completion_logps(model, p, c).sum(), completion_logps(model, p, r).sum()] for p, c, r in PAIRS]
    lc, lr = (torch.stack(x) for x in zip(*pol, strict=True))
    rc, rr = (torch.stack(x) for x in zip(*ref, strict=True))
    loss = smoothed_sigmoid_loss((lc - rc) - (lr - rr), beta, ls)
    metrics = reward_metrics(beta * (lc - rc).detach(), beta * (lr - rr).detach())
    return loss, {**metrics, "logps/chosen": lc.mean().item(), "logps/rejected": lr.mean().item()}


def paper_cpo(model, beta: float, ls: float, cpo_alpha: float):
    chosen = [completion_logps(model, p, c) for p, c, _ in PAIRS]
    lc = torch.stack([t.sum() for t in chosen])
    lr = torch.stack([completion_logps(model, p, r).sum() for p, _, r in PAIRS])
    nll = -torch.cat(chosen).mean()  # token mean over every chosen completion token of the batch
    loss = smoothed_sigmoid_loss(lc - lr, beta, ls) + cpo_alpha * nll
    metrics = reward_metrics(beta * lc.detach(), beta * lr.detach())
    return loss, {
        **metrics,
        "logps/chosen": lc.mean().item(),
        "logps/rejected": lr.mean().item(),
        "nll_loss": nll.item(),
    }


def paper_orpo(model, beta: float, ls: float, cpo_alpha: float):
    lc = torch.stack([completion_logps(model, p, c).mean() for p, c, _ in PAIRS])
    lr = torch.stack([completion_logps(model, p, r).mean() for p, _, r in PAIRS])
    nll = -torch.cat([token_logps(model, p + c) for p, c, _ in PAIRS]).mean()  # prompt tokens included, as TRL
    log_odds = (lc - lr) - (torch.log1p(-lc.exp()) - torch.log1p(-lr.exp()))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    metrics = reward_metrics(beta * lc.detach(), beta * lr.detach())
    return loss, {
        **metrics,
        "logps/chosen": lc.mean().item(),
        "logps/rejected": lr.mean().item(),
        "nll_loss": nll.item(),
        "log_odds_ratio": ratio.mean().item(),
        "log_odds_chosen": log_odds.mean().item(),
    }


PAPER = {"dpo": paper_dpo, "cpo": paper_cpo, "orpo": paper_orpo}


@pytest.mark.parametrize(
    ("objective", "beta", "ls", "cpo_alpha"),
    [
        ("dpo", 0.1, 0.0, 1.0),
        ("dpo", 0.5, 0.2, 1.0),
        ("cpo", 0.1, 0.0, 1.0),
        ("cpo", 0.3, 0.1, 0.5),
        ("orpo", 0.1, 0.0, 1.0),
        ("orpo", 1.0, 0.0, 1.0),
    ],
)
def test_harness_matches_paper_formula(
    tiny_llama_dir: Path, init_state: dict, objective: str, beta: float, ls: float, cpo_alpha: float
) -> None:
    """Loss, reward/logp metrics and every LoRA gradient equal the paper's formula on the same batch."""
    loss, metrics, grads = trl_loss_and_grads(tiny_llama_dir, objective, PAIRS, LORA, init_state, beta, ls, cpo_alpha)

    model = peft_model(tiny_llama_dir, init_state)
    want_loss, want_metrics = PAPER[objective](model, beta, ls, cpo_alpha)
    want_loss.backward()
    want_grads = {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.requires_grad}

    assert loss == pytest.approx(want_loss.item(), abs=ATOL)
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=ATOL), name
    assert grads.keys() == want_grads.keys()
    assert all(want_grads[k].abs().max() > 0 for k in grads)  # every weight has a gradient to compare
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=ATOL, rtol=0, msg=name)
    if objective == "dpo":  # the reference is the base: the starting adapter already moves the rewards
        assert abs(metrics["rewards/chosen"]) > 1e-3


def test_dpo_token_metrics(tiny_llama_dir: Path, init_state: dict) -> None:
    """DPO's per-token metrics: entropy (all completion tokens), vocabulary-mean logits and
    argmax accuracy (token means over the batch's chosen/rejected completion tokens), num_tokens."""
    _, metrics, _ = trl_loss_and_grads(tiny_llama_dir, "dpo", PAIRS, LORA, init_state, beta=0.1)
    model = peft_model(tiny_llama_dir, init_state)
    with torch.no_grad():
        sides = {"chosen": [], "rejected": []}
        for p, c, r in PAIRS:
            for side, completion in (("chosen", c), ("rejected", r)):
                logits = model(input_ids=torch.tensor([p + completion])).logits[0, len(p) - 1 : -1]
                sides[side].append((logits, torch.tensor(completion)))
    logits = {s: torch.cat([lg for lg, _ in v]) for s, v in sides.items()}
    targets = {s: torch.cat([t for _, t in v]) for s, v in sides.items()}
    every = torch.cat([logits["chosen"], logits["rejected"]])
    entropy = -(every.softmax(-1) * every.log_softmax(-1)).sum(-1).mean()
    accuracy = (logits["chosen"].argmax(-1) == targets["chosen"]).float().mean()
    assert metrics["entropy"] == pytest.approx(entropy.item(), abs=ATOL)
    assert metrics["logits/chosen"] == pytest.approx(logits["chosen"].mean().item(), abs=ATOL)
    assert metrics["logits/rejected"] == pytest.approx(logits["rejected"].mean().item(), abs=ATOL)
    assert metrics["mean_token_accuracy"] == pytest.approx(accuracy.item(), abs=ATOL)
    assert metrics["num_tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in PAIRS)


@pytest.mark.parametrize("objective", ["dpo", "cpo", "orpo"])
def test_rows_equal_trl_tokenization(tiny_llama_dir: Path, tmp_path: Path, objective: str) -> None:
    """The batch the harness builds from token ids is the batch TRL builds from the same text
    (its own tokenization: DPO appends EOS; CPO/ORPO prepend BOS and append EOS)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [("Reverse the words.\n", " apple river", " river"), ("Answer.\n", " yes", " no no")]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    pairs = []
    for prompt, chosen, rejected in texts:
        assert ids(prompt + chosen)[: len(ids(prompt))] == ids(prompt)  # no token merges across the boundary
        bos = [tok.bos_token_id] if objective != "dpo" else []
        pairs.append((bos + ids(prompt), ids(chosen) + [tok.eos_token_id], ids(rejected) + [tok.eos_token_id]))
    text_data = Dataset.from_dict({k: [t[i] for t in texts] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = build_trainer(objective, model, tok, LORA, 0.1, 0.0, 1.0, str(tmp_path), train_dataset=text_data)

    theirs = collate(trainer, list(trainer.train_dataset))
    ours = collate(trainer, preference_rows(objective, pairs))
    tensors = {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
    assert tensors == {k for k, v in ours.items() if isinstance(v, torch.Tensor)}
    for key in tensors:
        assert torch.equal(theirs[key], ours[key]), key


def test_rejects_what_it_cannot_reproduce(tiny_llama_dir: Path, init_state: dict) -> None:
    with pytest.raises(ValueError, match="unknown objective"):
        trl_loss_and_grads(tiny_llama_dir, "kto", PAIRS, LORA, init_state, beta=0.1)
    with pytest.raises(ValueError, match="dropout"):
        trl_loss_and_grads(tiny_llama_dir, "dpo", PAIRS, {**LORA, "lora_dropout": 0.1}, init_state, beta=0.1)
    with pytest.raises(ValueError, match="label smoothing"):
        trl_loss_and_grads(tiny_llama_dir, "dpo", PAIRS, LORA, init_state, beta=0.1, label_smoothing=0.5)
    partial = dict(list(init_state.items())[1:])
    with pytest.raises(ValueError, match="init_state keys"):
        trl_loss_and_grads(tiny_llama_dir, "cpo", PAIRS, LORA, partial, beta=0.1)
