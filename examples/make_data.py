"""Generate the quickstart's three synthetic instruction datasets (alpaca JSONL, fixed seeds).

Each task has answers that can be checked exactly:

- ``numbers.jsonl``: write a number in words (``"47"`` -> ``"forty-seven"``);
- ``arithmetic.jsonl``: add two numbers (``"37 + 58"`` -> ``"95"``);
- ``dates.jsonl``: rewrite an ISO date in words (``"2021-03-07"`` -> ``"March 7, 2021"``).

Run ``python examples/make_data.py`` to rewrite the files under ``examples/data/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from collections.abc import Callable
from pathlib import Path

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()
MONTHS = ("January February March April May June July August September October November December").split()


def in_words(n: int) -> str:
    """``n`` (0-99) in English words: ``7`` -> ``seven``, ``47`` -> ``forty-seven``."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def number_record(rng: random.Random) -> dict[str, str]:
    n = rng.randint(1, 99)
    return {"instruction": "Write the number in words.", "input": str(n), "output": in_words(n)}


def arithmetic_record(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def date_record(rng: random.Random) -> dict[str, str]:
    day = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 40))
    return {
        "instruction": "Write the date in words.",
        "input": day.isoformat(),
        "output": f"{MONTHS[day.month - 1]} {day.day}, {day.year}",
    }


TASKS: dict[str, tuple[Callable[[random.Random], dict[str, str]], int]] = {
    "numbers": (number_record, 1),
    "arithmetic": (arithmetic_record, 2),
    "dates": (date_record, 3),
}


def write(task: str, count: int, out_dir: Path) -> Path:
    make, seed = TASKS[task]
    rng = random.Random(seed)
    path = out_dir / f"{task}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            f.write(json.dumps(make(rng)) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="records per task")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        print(write(task, args.count, args.out))


if __name__ == "__main__":
    main()
