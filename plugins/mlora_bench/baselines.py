"""Child processes of ``mlora bench``: one method's training run, measured from inside.

    python -m mlora_bench.baselines peft SPEC.json RESULT.json
    python -m mlora_bench.baselines mlora SPEC.json RESULT.json

``peft`` trains one job the Alpaca-LoRA way: ``LlamaForCausalLM`` + ``peft.get_peft_model``
(LoRA on q_proj/v_proj), AdamW, micro-batches padded to a multiple of 8 with gradient
accumulation, in a plain training loop (no HF ``Trainer``). ``mlora`` trains the jobs of an
mlora config in one :class:`~mlora_core.training.engine.Engine`. Both load the model first, then (when
the spec names a ``go_file``) wait for it, so that concurrent children start training together.
The result holds the training phase's wall and CPU time, the tokens trained (non-pad and
padded) and the process's peak memory.

A spec's ``memory_cap_bytes`` (CUDA) caps the process with
``torch.cuda.set_per_process_memory_fraction`` before the model loads. A child that runs out
of memory writes ``{"completed": false, "out_of_memory": true, "reason": ...}`` and exits 3;
another error writes the same with ``out_of_memory`` false and exits 1.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from mlora_core.plugin_api.conventions import IGNORE_INDEX, pad_token_id
from mlora_core.training.memory import reset_step_peak, step_peak


def _start_training_phase(device: str) -> None:
    """Measure peak memory from here: the model is loaded; what loading freed goes back to the OS.

    Every method's peak is its training phase's, measured the same way: on CPU the process's
    peak RSS after glibc has returned the memory loading freed (GGUF dequantization leaves
    hundreds of MiB otherwise, hiding what training needs); on CUDA the allocator's peak.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    reset_step_peak(device)


def _load_peak_bytes() -> int:
    """The process's peak RSS so far (before :func:`_start_training_phase` resets it)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _apply_memory_cap(spec: dict[str, Any]) -> None:
    """On CUDA, cap this process's allocator at ``memory_cap_bytes`` (none on CPU: no such API)."""
    import torch

    cap, device = spec.get("memory_cap_bytes"), spec["device"]
    if cap and device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device))


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is the device running out of memory."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if type(seen).__name__ == "OutOfMemoryError" or "out of memory" in text or "ALLOC_FAILED" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _wait_for_go(spec: dict[str, Any]) -> None:
    """Tell the parent this child is loaded, then wait until it says go."""
    if not spec.get("go_file"):
        return
    Path(spec["ready_file"]).touch()
    while not Path(spec["go_file"]).exists():
        time.sleep(0.05)


def _load_llama(path_text: str, dtype_name: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mlora_core.models.paths import resolve_model_path

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    path = resolve_model_path(path_text)
    model: Any
    if path.is_file():  # a .gguf file: transformers dequantizes it to fp32
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(dtype).to(device)
    model.config.use_cache = False
    return model, tokenizer


def _samples(spec: dict[str, Any], tokenizer: Any) -> list[Any]:
    """The job's training samples, in file order, tokenized by mlora's ``alpaca`` data loader."""
    from mlora_core.config.schema import DataConfig
    from mlora_core.plugin_api.host import create_plugin_manager

    config = DataConfig(type="alpaca", path=spec["data"], cutoff_len=spec["seq_len"], val_set_size=0)
    loader = create_plugin_manager(autoload=False).data_loaders.create(config.type)
    return loader.load(config, tokenizer, seed=0).train


def run_peft(spec: dict[str, Any]) -> dict[str, Any]:
    """One Alpaca-LoRA job: PEFT LoRA over the frozen base, plain loop with gradient accumulation."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    _apply_memory_cap(spec)
    model, tokenizer = _load_llama(spec["model"], spec["dtype"], device)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM"
    )
    torch.manual_seed(spec.get("seed", 42))
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    samples = _samples(spec, tokenizer)
    batch, micro = spec["batch_size"], spec["micro_batch_size"]
    pad = pad_token_id(tokenizer)
    _wait_for_go(spec)
    load_peak = _load_peak_bytes()
    _start_training_phase(device)
    cpu0, wall0, started = time.process_time(), time.perf_counter(), time.time()
    real = padded = 0
    losses = []
    for step in range(spec["steps"]):
        rows = samples[step * batch : (step + 1) * batch]
        if not rows:
            break
        for i in range(0, len(rows), micro):
            chunk = rows[i : i + micro]
            width = -(-max(len(s.input_ids) for s in chunk) // 8) * 8  # alpaca-lora: pad_to_multiple_of=8
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                n = len(s.input_ids)
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            (out.loss * len(chunk) / len(rows)).backward()
            losses.append(float(out.loss.detach()))
            real += int(mask.sum())
            padded += mask.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return {
        "train_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "started": started,
        "ended": time.time(),
        "job_latency_s": [time.perf_counter() - wall0],
        "real_tokens": real,
        "padded_tokens": padded,
        "peak_memory_bytes": step_peak(device),  # no resets since the training phase began
        "load_peak_bytes": load_peak,
        "final_loss": losses[-1] if losses else None,
    }


def run_mlora(spec: dict[str, Any]) -> dict[str, Any]:
    """The jobs of an mlora config, together in one engine."""
    import torch

    from mlora_core.config.schema import load_config
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_core.training.engine import Engine

    torch.set_num_threads(spec["threads"])
    _apply_memory_cap(spec)
    config = load_config(spec["config"], [])
    engine = Engine(config, create_plugin_manager())
    engine.setup()
    _wait_for_go(spec)
    load_peak = _load_peak_bytes()
    _start_training_phase(spec["device"])
    cpu0, wall0, started = time.process_time(), time.perf_counter(), time.time()
    summary = engine.train()
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize(spec["device"])
    failed = [j for j in summary["jobs"] if j["status"] == "failed"]
    reason = "; ".join(f"{j['name']}: {j['error']}" for j in failed)
    return {
        "completed": not failed,
        "reason": reason or None,
        "out_of_memory": "out of memory" in reason,
        "train_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "started": started,
        "ended": time.time(),
        "job_latency_s": [j["latency_s"] for j in summary["jobs"]],
        "real_tokens": engine.stats.real_tokens,
        "padded_tokens": engine.stats.padded_tokens,
        # the engine resets the peak every step and keeps the highest; the rest ran since the last reset
        "peak_memory_bytes": max(engine.stats.peak_bytes, step_peak(spec["device"])),
        "load_peak_bytes": load_peak,
        "statuses": [j["status"] for j in summary["jobs"]],
        "padding_fraction": summary.get("padding_fraction"),  # summary.json's, as the run reports it
    }


def main(argv: list[str]) -> int:
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run_peft(spec) if kind == "peft" else run_mlora(spec)
    except Exception as exc:
        oom = _is_out_of_memory(exc)
        reason = "out of memory" if oom else f"{type(exc).__name__}: {exc}"[:300]
        Path(result_path).write_text(json.dumps({"completed": False, "out_of_memory": oom, "reason": reason}))
        if not oom:
            raise
        print(f"mlora bench child: {kind}: out of memory: {str(exc)[:300]}", file=sys.stderr)
        return 3
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
