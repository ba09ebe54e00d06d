"""CUDA check of mlora_core.generation.decode: tokens equal PEFT's on the GPU; timing mixed vs one at a time."""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = ["tests", "plugins", "."]
from conftest import build_tiny_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mlora_core.generation.decode import GenerationRequest, GenerationSettings, generate  # noqa: E402
from mlora_core.plugin_api.routing import RowRouter  # noqa: E402
from mlora_lora.adapter import LoraAdapterType  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
print("device", dev, torch.__version__, torch.cuda.get_device_name() if dev == "cuda" else "")
root = Path(tempfile.mkdtemp())
base = build_tiny_llama(root / "m", initializer_range=0.3)
tok = AutoTokenizer.from_pretrained(base)
adapters = {}
for i, targets in enumerate([["q_proj", "v_proj"], ["k_proj", "down_proj", "up_proj"]]):
    m = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(i)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    m.save_pretrained(root / f"a{i}")
    adapters[f"a{i}"] = root / f"a{i}"
prompts = [tok(t)["input_ids"] for t in ["Reverse the words: apple", "Repeat", "garden window silver orange rocket"]]
NEW = 10
out = {}
for dtype in (torch.float32, torch.bfloat16):
    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype).to(dev).requires_grad_(False)
    router = RowRouter()
    for name, d in adapters.items():
        LoraAdapterType().load(model, name, str(d), router)
    names = [None, *adapters]
    reqs = [GenerationRequest(p, names[(i + j) % 3]) for j in range(3) for i, p in enumerate(prompts)]
    res = generate(model, router, reqs, GenerationSettings(max_new_tokens=NEW), {tok.eos_token_id}, 0)
    same = 0
    for name in names:
        ref = LlamaForCausalLM.from_pretrained(base, dtype=dtype).to(dev)
        if name:
            ref = PeftModel.from_pretrained(ref, str(adapters[name])).to(dev)
        ref.eval()
        for r, q in zip(res, reqs, strict=True):
            if q.adapter != name:
                continue
            ids = torch.tensor([q.prompt_ids], device=dev)
            g = ref.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
            g = g.tolist()
            g = g[: g.index(tok.eos_token_id)] if tok.eos_token_id in g else g
            same += g == r.token_ids
    hot = GenerationSettings(max_new_tokens=NEW, do_sample=True, temperature=3.0, top_p=0.9, seed=3)
    s1 = [r.token_ids for r in generate(model, router, reqs, hot, set(), 0)]
    s2 = [r.token_ids for r in generate(model, router, reqs, hot, set(), 0, 2)]
    out[str(dtype)] = {"rows_equal_peft": f"{same}/{len(reqs)}", "sampling_reproducible": s1 == s2}
    print(dtype, out[str(dtype)], flush=True)

# timing: a SmolLM2-135M-shaped random model, N adapters, mixed batch vs one adapter at a time
cfg = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30 if dev == "cuda" else 1,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).to(dev).requires_grad_(False)
router = RowRouter()
lt = LoraAdapterType()
from mlora_core.config.schema import AdapterConfig  # noqa: E402

for i in range(32):
    ad = lt.attach(model, f"x{i}", AdapterConfig(r=8, alpha=16, dropout=0.0), router)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.02)
for n_adapters, per in ((8, 4), (32, 1)):
    names = [f"x{i}" for i in range(n_adapters)]
    g = torch.Generator().manual_seed(0)
    reqs = [
        GenerationRequest(torch.randint(3, 49000, (40,), generator=g).tolist(), n) for n in names for _ in range(per)
    ]
    st = GenerationSettings(max_new_tokens=64 if dev == "cuda" else 3)
    times = {"mixed": [], "one_at_a_time": []}
    generate(model, router, reqs[:2], GenerationSettings(max_new_tokens=2), set(), 0)
    for _ in range(3):
        torch.cuda.synchronize() if dev == "cuda" else None
        t = time.perf_counter()
        generate(model, router, reqs, st, set(), 0)
        torch.cuda.synchronize() if dev == "cuda" else None
        times["mixed"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for n in names:
            generate(model, router, [r for r in reqs if r.adapter == n], st, set(), 0)
        torch.cuda.synchronize() if dev == "cuda" else None
        times["one_at_a_time"].append(time.perf_counter() - t)
    tokens = len(reqs) * st.max_new_tokens
    row = {
        k: {"tok_s_median": tokens / statistics.median(v), "tok_s_min": tokens / max(v), "tok_s_max": tokens / min(v)}
        for k, v in times.items()
    }
    row["ratio"] = row["mixed"]["tok_s_median"] / row["one_at_a_time"]["tok_s_median"]
    out[f"{n_adapters}x{per}"] = row
    print(n_adapters, per, json.dumps(row), flush=True)
    if dev == "cpu":
        break
print(json.dumps(out))
