"""Generate a synthetic preference dataset for addition (preference JSONL, fixed seed).

Each record asks for the sum of two two-digit numbers; the chosen answer is the sum, the
rejected one is off by a small amount (1 to 3, or 10: a dropped or extra carry)::

    {"prompt": "17 + 25 =", "chosen": " 42", "rejected": " 43"}

Run ``python examples/make_dpo_data.py`` to rewrite ``examples/data/arith_preference.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

#: How far a rejected answer is from the sum.
SLIPS = (-10, -3, -2, -1, 1, 2, 3, 10)


def preference_record(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    # the completions start with a space, so they read right under every template (``none`` too)
    return {"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + rng.choice(SLIPS)}"}


def records(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` records, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [preference_record(rng) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="records to write")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "arith_preference.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for record in records(args.n, args.seed):
            f.write(json.dumps(record) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
