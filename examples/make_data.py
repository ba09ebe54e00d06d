"""Generate the quickstart's three synthetic instruction datasets (alpaca JSONL, fixed seeds).

Each task has answers that can be checked exactly:

- ``reverse.jsonl``: spell a word backwards (``"planet"`` -> ``"tenalp"``);
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

WORDS = (
    "apple river planet garden window silver orange rocket pencil basket candle forest "
    "guitar island jacket kitten ladder marble needle pillow quartz rabbit saddle tomato "
    "velvet walnut yellow zipper anchor bridge castle dragon engine falcon glider harbor "
    "lantern meadow nickel oyster parrot quiver ribbon shadow thunder violet wizard cobalt "
    "summer winter autumn spring mirror bottle button cotton copper ginger hammer magnet"
).split()
MONTHS = ("January February March April May June July August September October November December").split()


def reverse_record(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}


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
    "reverse": (reverse_record, 1),
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
