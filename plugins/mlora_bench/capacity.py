"""``mlora bench --memory-cap-gib``: the most concurrent jobs each method fits under one budget.

On CUDA it is **measured**: every method runs at 1, 2, 4, 8, 16 jobs under the budget (each
child capped with ``torch.cuda.set_per_process_memory_fraction``; the parallel baseline's N
processes get budget / N each; mlora's ``scheduler.memory_limit`` is the budget, so its
admission keeps a step inside it). A child that runs out of memory is a result, "did not
complete", and the method's larger counts are not tried. On CPU there is no per-process cap,
so the figures are **extrapolated** linearly from the measured peaks. Every figure carries its
``basis``: ``measured``, ``extrapolated``, or ``not enforced`` (the sweep run on CPU, which
only tests the plumbing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

COUNTS = (1, 2, 4, 8, 16)
#: The methods a sweep runs (mlora_one and the floor are not job-count methods).
SWEEP_METHODS = ("baseline_seq", "baseline_parallel", "mlora", "mlora_packed")
UNBOUNDED = 10**6  # "no limit in sight": an extrapolated method whose peak does not grow with jobs


class PointFailed(Exception):
    """One sweep point did not complete; ``reason`` says why (e.g. "out of memory")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def extrapolate(rows: dict[str, dict[str, Any]], jobs: int, cap: float) -> dict[str, Any]:
    """Most concurrent jobs under ``cap`` bytes, extrapolated linearly from ``rows``' median peaks.

    baseline_seq: 1 if one job fits (it runs one at a time); baseline_parallel: cap / one
    process's peak; mlora and mlora_packed: a line through one job (mlora_one's peak, else the
    PEFT job's) and N jobs (theirs): each extra job adds its adapter, optimizer state and rows.
    """
    methods: dict[str, dict[str, Any]] = {}
    peak = {k: r["peak_memory_bytes"]["median"] for k, r in rows.items() if r.get("peak_memory_bytes")}
    if "baseline_seq" in peak:
        methods["baseline_seq"] = {"max_jobs": 1 if peak["baseline_seq"] <= cap else 0}
    if "baseline_parallel" in peak:
        methods["baseline_parallel"] = {
            "max_jobs": int(cap // rows["baseline_parallel"]["single_process_peak_bytes"]["median"])
        }
    one = peak.get("mlora_one", peak.get("baseline_seq"))
    for name in ("mlora", "mlora_packed"):
        if name in peak and one is not None and jobs > 1:
            per_job = max(0.0, (peak[name] - one) / (jobs - 1))
            first = peak[name] - (jobs - 1) * per_job
            fits = 0 if first > cap else (UNBOUNDED if per_job == 0 else 1 + int((cap - first) // per_job))
            methods[name] = {"max_jobs": fits, "per_job_bytes": per_job}
    for entry in methods.values():
        entry["basis"] = "extrapolated"
    return {"cap_bytes": cap, "basis": "extrapolated", "methods": methods}


def sweep(
    run_point: Callable[[str, int], dict[str, Any]],
    methods: Sequence[str],
    counts: Sequence[int] = COUNTS,
    *,
    enforced: bool = True,
    cap: float = 0.0,
    seq_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run every method at growing job counts under the budget until one does not complete.

    Args:
        run_point: runs ``method`` with ``count`` jobs under the budget; returns its run
            (``tokens_per_s``, ``peak_memory_bytes``, ``padding_fraction``) or raises
            :class:`PointFailed`.
        methods: the methods to sweep (those of :data:`SWEEP_METHODS` among them).
        counts: the job counts, ascending.
        enforced: whether the budget was enforced (CUDA); the basis is ``not enforced`` if not.
        cap: the budget in bytes (recorded).
        seq_counts: baseline_seq runs one job at a time, so a count's peak is its largest
            job's: it runs only at these counts (default: all), and the others take the
            result of the largest of them (their basis says so).

    Returns:
        ``{"cap_bytes", "basis", "counts", "methods": {name: {"max_jobs", "basis", "points"}}}``,
        each point ``{"jobs", "completed", "reason", "tokens_per_s", ...}``.
    """
    basis = "measured" if enforced else "not enforced"
    result: dict[str, Any] = {"cap_bytes": cap, "basis": basis, "counts": list(counts), "methods": {}}
    for method in [m for m in methods if m in SWEEP_METHODS]:
        ran = list(seq_counts or counts) if method == "baseline_seq" else list(counts)
        points = _sweep_method(run_point, method, [c for c in counts if c in ran])
        entry: dict[str, Any] = {"basis": basis, "points": points}
        if method == "baseline_seq" and points and points[-1]["completed"] and len(points) < len(counts):
            last = points[-1]["jobs"]
            entry["basis"] = f"{basis} with {last} job(s); more jobs repeat them one at a time"
            points += [{**points[-1], "jobs": c, "measured": False} for c in counts if c > last]
        done = [p["jobs"] for p in points if p["completed"]]
        entry["max_jobs"] = max(done) if done else 0
        result["methods"][method] = entry
    return result


def _sweep_method(
    run_point: Callable[[str, int], dict[str, Any]], method: str, counts: list[int]
) -> list[dict[str, Any]]:
    """One method's points, ascending; stops at the first count that does not complete."""
    points: list[dict[str, Any]] = []
    for count in counts:
        try:
            run = run_point(method, count)
        except PointFailed as exc:
            points.append({"jobs": count, "completed": False, "reason": exc.reason})
            break
        points.append(
            {
                "jobs": count,
                "completed": True,
                "reason": None,
                "tokens_per_s": run["tokens_per_s"],
                "padding_fraction": run.get("padding_fraction"),
                "peak_memory_bytes": run["peak_memory_bytes"],
            }
        )
    return points


def markdown(cap: dict[str, Any]) -> str:
    """The memory-cap figures as Markdown: a line of most jobs per method, and the sweep's table."""
    gib = cap["cap_bytes"] / 2**30
    got = ", ".join(f"{name} {e['max_jobs']} ({e['basis']})" for name, e in cap["methods"].items())
    lines = [f"Most concurrent jobs under {gib:.1f} GiB ({cap['basis']}): {got}"]
    if "counts" not in cap:
        return "\n".join(lines)
    names = list(cap["methods"])
    lines += ["", "| jobs | " + " | ".join(f"{n} tokens/s (peak MiB)" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for count in cap["counts"]:
        cells = [_point_cell(cap["methods"][n]["points"], count) for n in names]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _point_cell(points: list[dict[str, Any]], count: int) -> str:
    point = next((p for p in points if p["jobs"] == count), None)
    if point is None:
        return "not run"
    if not point["completed"]:
        return f"did not complete ({point['reason']})"
    return f"{point['tokens_per_s']:.0f} ({point['peak_memory_bytes'] / 2**20:.0f})"
