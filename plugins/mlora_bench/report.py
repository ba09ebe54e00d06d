"""``mlora bench``'s result: per-method medians (min-max) over the rounds, ratios, the Markdown table."""

from __future__ import annotations

import statistics
from typing import Any

from mlora_bench import capacity

STATS = ("latency_s", "tokens_per_s", "padded_tokens_per_s", "padding_fraction", "peak_memory_bytes", "utilisation")
#: The methods whose throughput is compared with every other's (``ratios``).
COMPARED = ("mlora", "mlora_packed")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row: median, min and max of each statistic over its rounds.

    A method with a round that did not complete (a child out of memory) gets
    ``{"completed": False, "reason": ...}`` and no statistics.
    """
    failed = [r for r in runs if not r.get("completed", True)]
    if failed:
        return {"rounds": len(runs), "completed": False, "reason": failed[0]["reason"]}
    row: dict[str, Any] = {
        "rounds": len(runs),
        "completed": True,
        "real_tokens": runs[0]["real_tokens"],
        "padded_tokens": runs[0]["padded_tokens"],
    }
    for key in (*STATS, "single_process_peak_bytes", "load_peak_bytes"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    return row


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``mlora/<method>`` (and ``mlora_packed/<method>``), on medians: > 1 means mlora has more of
    it (tokens/s) or needs more (s, bytes). Methods that did not complete are left out."""
    done = {name: row for name, row in rows.items() if row.get("completed", True)}
    return {
        f"{m}/{name}": {
            key: done[m][key]["median"] / row[key]["median"]
            for key in ("tokens_per_s", "padded_tokens_per_s", "latency_s", "peak_memory_bytes")
        }
        for m in COMPARED
        if m in done
        for name, row in done.items()
        if name != m
    }


def _cell(stat: dict[str, float] | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    return f"{stat['median'] / scale:{fmt}} ({stat['min'] / scale:{fmt}}-{stat['max'] / scale:{fmt}})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _method_line(name: str, r: dict[str, Any], ratio: dict[str, float]) -> str:
    if not r.get("completed", True):
        return f"| {name} | did not complete ({r['reason']}) |" + " - |" * 8
    speed, memory = ratio.get("tokens_per_s"), ratio.get("peak_memory_bytes")
    shown = "1.00 | 1.00" if name == "mlora" else f"{_ratio(speed)} | {_ratio(memory)}"
    return (
        f"| {name} | {_cell(r['latency_s'], '.1f')} | {_cell(r['tokens_per_s'], '.0f')} | "
        f"{_cell(r['padded_tokens_per_s'], '.0f')} | {_cell(r.get('padding_fraction'), '.3f')} | "
        f"{_cell(r['peak_memory_bytes'], '.0f', 2**20)} | {_cell(r.get('load_peak_bytes'), '.0f', 2**20)} | "
        f"{_cell(r['utilisation'], '.2f')} | {shown} |"
    )


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table, then the packed ratios and the memory-cap figures if any."""
    lines = [
        "| method | latency s | tokens/s non-pad | tokens/s padded | padding | peak MiB (training) | load peak MiB "
        "| util | mlora / method tokens/s | mlora / method peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        lines.append(_method_line(name, r, result["ratios"].get(f"mlora/{name}", {})))
    packed = {k.split("/")[1]: v["tokens_per_s"] for k, v in result["ratios"].items() if k.startswith("mlora_packed/")}
    if packed:
        lines.append("\nmlora_packed / method tokens/s: " + ", ".join(f"{k} {v:.2f}" for k, v in packed.items()))
    if result.get("memory_cap"):
        lines.append("\n" + capacity.markdown(result["memory_cap"]))
    return "\n".join(lines)
