"""Write data/antonyms.jsonl: small chat conversations (fixed content, no randomness)."""

import json
from pathlib import Path

PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("early", "late"),
    ("full", "empty"),
    ("open", "closed"),
    ("strong", "weak"),
    ("high", "low"),
    ("rich", "poor"),
    ("young", "old"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("up", "down"),
    ("left", "right"),
    ("inside", "outside"),
    ("near", "far"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("cheap", "expensive"),
    ("sweet", "sour"),
    ("first", "last"),
    ("long", "short"),
    ("heavy", "light"),
    ("brave", "afraid"),
    ("true", "false"),
    ("win", "lose"),
    ("give", "take"),
    ("buy", "sell"),
    ("push", "pull"),
    ("start", "finish"),
    ("day", "night"),
    ("north", "south"),
    ("east", "west"),
    ("summer", "winter"),
    ("friend", "enemy"),
    ("always", "never"),
    ("before", "after"),
]
SYSTEM = "You answer with one word."


def conversation(i: int, word: str, opposite: str) -> dict:
    messages = [
        {"role": "user", "content": f"What is the opposite of {word}?"},
        {"role": "assistant", "content": opposite},
    ]
    if i % 2 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    if i % 5 == 0:  # some two-turn conversations
        messages += [
            {"role": "user", "content": f"And the opposite of {opposite}?"},
            {"role": "assistant", "content": word},
        ]
    return {"messages": messages}


if __name__ == "__main__":
    out = Path(__file__).parent / "data" / "antonyms.jsonl"
    out.write_text("".join(json.dumps(conversation(i, *p)) + "\n" for i, p in enumerate(PAIRS)))
