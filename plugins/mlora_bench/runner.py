"""``mlora bench``'s runs: each method's child processes, started, watched and measured.

A :class:`Bench` holds one setting (model, jobs, rows); :meth:`Bench.run` runs one method once
in fresh children (:mod:`mlora_bench.baselines`) and returns what they measured. A child that
fails, runs out of memory or outlives the deadline stops its siblings and raises
:class:`ChildFailed`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mlora_bench.workloads import write_datasets, write_floor_data

LR = 3e-4


class ChildFailed(Exception):
    """A child process of a method failed; ``out_of_memory`` says whether it ran out of memory."""

    def __init__(self, kind: str, reason: str, out_of_memory: bool) -> None:
        super().__init__(f"bench child {kind} failed: {reason}")
        self.reason, self.out_of_memory = reason, out_of_memory


def _failure(result_file: Path, code: int | None) -> tuple[str, bool]:
    """Why a child failed (what it wrote in its result file, else its exit status) and whether from OOM."""
    try:
        result = json.loads(result_file.read_text())
        return str(result["reason"]), bool(result.get("out_of_memory"))
    except (OSError, ValueError, KeyError):
        if code == -signal.SIGKILL:  # not one of ours (those are not asked): most likely the kernel's OOM killer
            return "killed by SIGKILL (out of host memory?)", True
        return ("over the time budget" if code is None else f"exit {code}"), False


class Bench:
    """One setting's methods, each :meth:`run` a fresh set of child processes.

    ``cap_bytes``: a memory budget (CUDA: each child is capped; mlora's ``memory_limit`` is it).
    ``args.deadline`` (optional, ``time.monotonic()``): children still running then are killed.
    """

    def __init__(self, args: argparse.Namespace, work: Path, model: str, cap_bytes: float | None = None) -> None:
        self.a, self.work, self.model, self.cap = args, work, model, cap_bytes
        self.batch = args.batch_size or 2 * args.micro_batch_size
        self.cores = args.threads or os.cpu_count() or 1  # threads granted to each method
        self.data = write_datasets(work, args.jobs, args.steps * self.batch, args.seq_len, args.workload)
        self.floor_data = write_floor_data(work, self.data, args.micro_batch_size)
        self.deadline: float | None = getattr(args, "deadline", None)
        self.counter = 0

    def _spec(self, processes: int = 1, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.a.dtype,
            "device": self.a.device,
            "seq_len": self.a.seq_len,
            "threads": self.cores,
            "memory_cap_bytes": None if self.cap is None else self.cap / processes,
            **extra,
        }

    def _poll(self, kind: str, tag: Path, procs: list[subprocess.Popen[bytes]], first: int = 0) -> bool:
        """True once every child exited 0; on a failure, or past the deadline, stops the others and raises.

        ``procs[i]`` is child ``first + i`` of ``tag`` (its result file's number).
        """
        codes = [p.poll() for p in procs]
        bad = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        late = self.deadline is not None and time.monotonic() > self.deadline
        if all(c == 0 for c in codes):
            return True
        if bad is None and not late:
            return False
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        i = bad if bad is not None else next(i for i, c in enumerate(codes) if c is None)
        raise ChildFailed(kind, *_failure(tag / f"result{first + i}.json", codes[i]))

    def _children(self, kind: str, specs: list[dict[str, Any]], together: bool) -> tuple[list[dict[str, Any]], float]:
        """Run children (all at once when ``together``); returns their results and the go time."""
        self.counter += 1
        tag = self.work / f"run{self.counter}"
        tag.mkdir()
        go = tag / "go"
        procs: list[subprocess.Popen[bytes]] = []
        for i, spec in enumerate(specs):
            if together:
                spec = {**spec, "ready_file": str(tag / f"ready{i}"), "go_file": str(go)}
            (tag / f"spec{i}.json").write_text(json.dumps(spec))
            files = [str(tag / f"spec{i}.json"), str(tag / f"result{i}.json")]
            procs.append(subprocess.Popen([sys.executable, "-m", "mlora_bench.baselines", kind, *files]))
            while not together and not self._poll(kind, tag, procs[-1:], first=i):
                time.sleep(0.05)
        go_time = time.time()
        if together:
            while not all((tag / f"ready{i}").exists() for i in range(len(specs))):
                self._poll(kind, tag, procs)
                time.sleep(0.05)
            go_time = time.time()
            go.touch()
            while not self._poll(kind, tag, procs):
                time.sleep(0.05)
        return [json.loads((tag / f"result{i}.json").read_text()) for i in range(len(specs))], go_time

    def _peft_specs(self, threads: int, processes: int) -> list[dict[str, Any]]:
        """One PEFT child per job; ``processes`` at once share the memory budget."""
        return [
            self._spec(
                processes,
                data=str(d),
                steps=self.a.steps,
                batch_size=self.batch,
                threads=threads,
                micro_batch_size=self.a.micro_batch_size,
                lr=LR,
            )
            for d in self.data
        ]

    def _scheduler(self, method: str) -> dict[str, Any]:
        """The ``scheduler:`` section of an mlora method's config."""
        packed = method == "mlora_packed" or self.a.packing
        kind = (self.a.packed_scheduler or self.a.scheduler) if method == "mlora_packed" else self.a.scheduler
        # Explicit either way: the default (null) packs wherever the backend can.
        section: dict[str, Any] = {"type": "trivial" if method == "floor" else kind, "packing": packed}
        if method == "mlora_seq":
            section["max_concurrent_jobs"] = 1  # the jobs one after another, in one process
        if self.cap is not None:
            section["memory_limit"] = int(self.cap)  # admission keeps a step inside the budget
        return section

    def _mlora_config(self, method: str) -> Path:
        """The config of an mlora method: its jobs, data and scheduler."""
        n, micro = self.a.jobs, self.a.micro_batch_size
        data, batch = {"mlora_one": (self.data[:1], self.batch), "floor": ([self.floor_data], n * self.batch)}.get(
            method, (self.data, self.batch)
        )
        micro = n * micro if method == "floor" else micro
        jobs = [
            {
                "name": "floor" if method == "floor" else f"job{i}",
                "adapter": {
                    "type": "lora",
                    "r": 8,
                    "alpha": 16,
                    "dropout": 0.05,
                    "target_modules": ["q_proj", "v_proj"],
                },
                "data": {"type": "alpaca", "path": str(d), "cutoff_len": self.a.seq_len, "val_set_size": 0},
                "train": {
                    "batch_size": batch,
                    "micro_batch_size": micro,
                    "lr": LR,
                    "max_steps": self.a.steps,
                    "shuffle": False,
                },
            }
            for i, d in enumerate(data)
        ]
        config = {
            "base_model": {
                "backend": "llama",
                "path": self.model,
                "dtype": self.a.dtype,
                "device": self.a.device,
                "activation_checkpointing": self.a.activation_checkpointing,
            },
            "scheduler": self._scheduler(method),
            "monitor": {"console": None},
            "output_dir": str(self.work / f"out{self.counter}-{method}"),
            "jobs": jobs,
        }
        path = self.work / f"{method}{self.counter}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _run_children(self, method: str) -> tuple[list[dict[str, Any]], float, float, int]:
        """Run ``method``'s children: their results, latency, training wall time and peak."""
        n = self.a.jobs
        if method == "baseline_seq":
            res, _ = self._children("peft", self._peft_specs(self.cores, 1), together=False)
            latency = sum(r["train_s"] for r in res)  # job k ends after jobs 1..k have trained
            return res, latency, latency, max(r["peak_memory_bytes"] for r in res)
        if method == "baseline_parallel":
            res, go = self._children("peft", self._peft_specs(max(1, self.cores // n), n), together=True)
            latency = max(r["ended"] for r in res) - go
            return res, latency, latency, sum(r["peak_memory_bytes"] for r in res)
        res, _ = self._children("mlora", [self._spec(config=str(self._mlora_config(method)))], together=False)
        if not res[0].get("completed", True):
            raise ChildFailed("mlora", res[0]["reason"], bool(res[0].get("out_of_memory")))
        return res, max(res[0]["job_latency_s"]), res[0]["train_s"], res[0]["peak_memory_bytes"]

    def run(self, method: str) -> dict[str, Any]:
        """One measured run of ``method``: latency, tokens, padding, CPU time, peak memory.

        Raises:
            ChildFailed: a child failed (ran out of memory, or an error).
        """
        threads = self.a.jobs * max(1, self.cores // self.a.jobs) if method == "baseline_parallel" else self.cores
        res, latency, wall, peak = self._run_children(method)
        real = sum(r["real_tokens"] for r in res)
        padded = sum(r["padded_tokens"] for r in res)
        cpu = sum(r["cpu_s"] for r in res)
        padding = res[0].get("padding_fraction") if len(res) == 1 else None
        return {
            "completed": True,
            "latency_s": latency,
            "train_wall_s": wall,
            "real_tokens": real,
            "padded_tokens": padded,
            "tokens_per_s": real / wall,
            "padded_tokens_per_s": padded / wall,
            "padding_fraction": (1 - real / padded if padded else 0.0) if padding is None else padding,
            "peak_memory_bytes": peak,
            "single_process_peak_bytes": max(r["peak_memory_bytes"] for r in res),
            "load_peak_bytes": max(r["load_peak_bytes"] for r in res),
            "utilisation": None if self.a.device.startswith("cuda") else cpu / wall / threads,
        }
