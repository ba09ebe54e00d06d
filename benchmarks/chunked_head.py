"""Peak memory and time of the LM head + cross-entropy: materialised logits against chunked.

At SmolLM2-135M's head shape (vocabulary 49,152, hidden 576; random weights, fp32, frozen),
for N learned positions, the forward and backward of the per-position losses, three ways:

- ``materialised``: ``cross_entropy(linear(h, W).float())``, what a step did before issue 15;
- ``chunked``: mlora's :class:`~mlora_core.training.loss.ChunkedLinearCrossEntropy` (128
  positions a chunk), what a step does now for a frozen head over >= 8,192 tokens;
- ``torch_chunked``: PyTorch 2.13's ``F.linear_cross_entropy`` with
  ``LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=128, acc_policy="compact")``.

Each measurement runs in a fresh process (peak RSS growth over the inputs, ``ru_maxrss``),
methods interleaved over ``--rounds``; medians reported. Also checks each method's losses and
input gradient against a float64 reference.

    python benchmarks/chunked_head.py --positions 512 2048 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VOCAB, HIDDEN = 49152, 576
METHODS = ("materialised", "chunked", "torch_chunked")


def measure(method: str, positions: int) -> dict[str, float]:
    """One method at one size, in this process: seconds, peak RSS growth (bytes), max errors."""
    from mlora_core.training.loss import CHUNK_POSITIONS, ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
    h0 = torch.randn(positions, HIDDEN, generator=g)
    targets = torch.randint(0, VOCAB, (positions,), generator=g)
    upstream = torch.rand(positions, generator=g)
    h = h0.clone().requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if method == "materialised":
        losses = F.cross_entropy(F.linear(h, weight).float(), targets, reduction="none")
    elif method == "chunked":
        losses = ChunkedLinearCrossEntropy.apply(h, weight, None, targets, CHUNK_POSITIONS)
    else:
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=128, acc_policy="compact")
        losses = F.linear_cross_entropy(h, weight, targets, reduction="none", options=options)
    (losses * upstream).sum().backward()
    seconds = time.perf_counter() - started
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    h64 = h0.double().requires_grad_()
    reference = F.cross_entropy(F.linear(h64, weight.double()), targets, reduction="none")
    (reference * upstream.double()).sum().backward()
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "loss_error": (losses.double() - reference).abs().max().item(),
        "grad_error": ((h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for n in args.positions:
            for method in METHODS:
                command = [sys.executable, __file__, "--threads", str(args.threads), "--child", method, str(n)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results.setdefault((n, method), []).append(json.loads(out.strip().splitlines()[-1]))
    print("| positions | method | peak MiB | seconds (fwd+bwd) | vs materialised | max loss error | max grad error |")
    print("|---|---|---|---|---|---|---|")
    for n in args.positions:
        base = statistics.median(r["seconds"] for r in results[(n, "materialised")])
        for method in METHODS:
            runs = results[(n, method)]
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_bytes"] for r in runs) / 2**20
            loss_error = max(r["loss_error"] for r in runs)
            grad_error = max(r["grad_error"] for r in runs)
            cells = [n, method, f"{peak:.0f}", f"{seconds:.2f}", f"{seconds / base:.2f}x"]
            print("| " + " | ".join(map(str, cells)) + f" | {loss_error:.1e} | {grad_error:.1e} |")


if __name__ == "__main__":
    main()
