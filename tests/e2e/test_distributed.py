"""Distributed training through the real launchers (``mlora run --nproc``, ``torchrun``), gloo on CPU.

Every run here is real worker processes over a tiny random LLaMA in fp32 with dropout 0; the
reference is the same config trained in one process (which the other tests hold equal to PEFT).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import family_targets, job, wait_for_checkpoint
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.training.engine import Engine

ENV = {**os.environ, "MLORA_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}


def _run(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mlora_core.cli.main", "run", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mlora_core.cli.main", "run", str(config), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _one_process(config: Path, host: Any, out: Path, *overrides: str) -> dict[str, Any]:
    """The same config trained in this process, into ``out``."""
    return Engine(load_config(config, [f"output_dir={out}", *overrides]), host).run()


def _adapters(out: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(out / n / "adapter_model.safetensors")) for n in names}


def _assert_same(ours: Path, reference: Path, names: list[str], rtol: float = 0, atol: float = 1e-6) -> None:
    """Every tensor within ``atol`` element-wise, or (``rtol``) within that relative Frobenius
    norm of the difference: reordered sums in float32 differ by rounding, which Adam's
    normalisation amplifies on near-zero gradients (see FACTS.md); a routing or loss
    normalisation defect gives 1e-2 or more."""
    theirs = _adapters(reference, names)
    for name, weights in _adapters(ours, names).items():
        assert weights.keys() == theirs[name].keys()
        for key, value in weights.items():
            if rtol:
                relative = float((value - theirs[name][key]).norm() / theirs[name][key].norm())
                assert relative <= rtol, f"{name} {key}: relative difference {relative:.2e}"
            else:
                torch.testing.assert_close(
                    value, theirs[name][key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
                )


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


def _four_jobs(data_dir: Path) -> list[dict[str, Any]]:
    return [
        job("a", data_dir / "a.jsonl", max_steps=6),
        job("b", data_dir / "b.jsonl", max_steps=4, batch_size=6, micro_batch_size=3),
        job("c", data_dir / "c.jsonl", max_steps=3, lr=2e-3),
        job("d", data_dir / "a.jsonl", max_steps=5, seed=7),
    ]


def _over_family(jobs: list[dict[str, Any]], model_type: str, model_dir: Path) -> dict[str, Any]:
    """``jobs`` retargeted to the family's layer names; the base_model section for its checkpoint."""
    for j in jobs:
        j["adapter"]["target_modules"] = family_targets(model_type, j["adapter"]["target_modules"])
    return {"backend": None, "path": str(model_dir)}


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_jobs_on_two_ranks_equal_one_process(make_config, data_dir, host, tmp_path, tiny_decoder, model_type):
    """Also over Phi-3 (fused projections), as over every family the backends load."""
    jobs = _four_jobs(data_dir)
    base = _over_family(jobs, model_type, tiny_decoder(model_type))
    config = make_config(
        jobs, base_model=base, monitor={"console": {}, "tensorboard": {}}, scheduler={"type": "optimal_fit"}
    )
    done = _run(config, "--nproc", "2", "distributed.strategy=jobs")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    _one_process(config, host, tmp_path / "alone")
    _assert_same(out, tmp_path / "alone", list("abcd"))

    summary = _summary(out)
    dist = summary["distributed"]
    assert dist["world_size"] == 2 and dist["strategy"] == "jobs" and dist["backend"] == "gloo"
    assert sorted(dist["placement"]) == list("abcd")
    assert {r for ranks in dist["placement"].values() for r in ranks} == {0, 1}  # both ranks trained
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 4
    assert [j["steps"] for j in summary["jobs"]] == [6, 4, 3, 5]
    assert len(dist["peak_memory_bytes"]) == 2 and min(dist["peak_memory_bytes"]) > 0
    # rank 0 reports every job, whatever rank trained it: once on the console, in metrics.jsonl, in TensorBoard
    for name in "abcd":
        assert done.stdout.count(f"[{name}] completed") == 1
    assert "placed on rank 1" in done.stdout and "strategy 'jobs'" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {n: [r["jobs"][n]["step"] for r in records if r["event"] == "step" and n in r["jobs"]] for n in "abcd"}
    assert steps == {"a": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3, 4], "c": [1, 2, 3], "d": [1, 2, 3, 4, 5]}
    assert [r["event"] for r in records].count("train_end") == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, n in (("a", 6), ("b", 4), ("c", 3), ("d", 5)):
        acc = EventAccumulator(str(out / "tensorboard" / name))  # each job's run
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, n + 1))


@pytest.mark.parametrize(
    ("packing", "model_type"),
    [(False, "llama"), (True, "llama"), (True, "qwen2"), (True, "gemma2"), (True, "phi3")],
    ids=["padded", "packed", "packed-qwen2", "packed-gemma2", "packed-phi3"],
)
def test_rows_on_two_ranks_equal_one_process_with_uneven_shares(
    make_config, data_dir, host, tmp_path, tiny_decoder, packing, model_type
):
    """Micro-batches of 3 rows split 1 + 2 over the ranks, and rows of different lengths: the
    ranks hold different learned-token counts in most steps, which averaging per-rank mean
    losses would get wrong. Packed: each rank packs its own share (on the wider model, whose
    rows hold several samples); also over Qwen2 (biases), Gemma 2 (tied embeddings, sliding
    windows, soft-capped logits) and Phi-3 (fused projections)."""
    jobs = [
        job("odd", data_dir / "a.jsonl", max_steps=5, batch_size=6, micro_batch_size=3, lr=5e-3),
        job("even", data_dir / "b.jsonl", max_steps=4, batch_size=4, micro_batch_size=2, lr=5e-3),
        job("single", data_dir / "c.jsonl", max_steps=4, batch_size=3, micro_batch_size=1, lr=5e-3),
    ]
    jobs[0]["adapter"] = {
        "type": "lora",
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["q_proj", "down_proj"],
    }
    base = _over_family(jobs, model_type, tiny_decoder(model_type, wide=packing))
    config = make_config(jobs, base_model=base, scheduler={"packing": packing})
    done = _run(config, "--nproc", "2", "distributed.strategy=rows")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    alone = _one_process(config, host, tmp_path / "alone")
    # LLaMA: within 1e-5; the other families' packed rows measured up to 1.4e-5 (Qwen2, Gemma 2)
    _assert_same(out, tmp_path / "alone", ["odd", "even", "single"], rtol=1e-5 if model_type == "llama" else 5e-5)

    summary = _summary(out)
    assert summary["distributed"]["strategy"] == "rows"
    assert summary["distributed"]["placement"]["odd"] == [0, 1]
    for ours, theirs in zip(summary["jobs"], alone["jobs"], strict=True):
        assert ours["steps"] == theirs["steps"] and ours["train_tokens"] == theirs["train_tokens"]
        assert ours["final_train_loss"] == pytest.approx(theirs["final_train_loss"], rel=1e-5)
        assert ours["eval_loss_after"] == pytest.approx(theirs["eval_loss_after"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["rows", "jobs"])
def test_a_dpo_job_beside_sft_on_two_ranks_equals_one_process(make_config, data_dir, host, tmp_path, strategy):
    """A DPO job (pairs, reference log-probabilities, reward metrics reduced over the ranks)
    beside an SFT job: the same adapters, held-out preference accuracy and step metrics."""
    pairs = Path(__file__).parents[2] / "examples" / "data" / "arith_preference.jsonl"
    dpo = job("dpo", pairs, max_steps=4, batch_size=6, micro_batch_size=3, lr=5e-3)
    dpo["data"].update(type="preference", val_set_size=8, cutoff_len=64)
    dpo["objective"] = {"type": "dpo", "beta": 0.5}
    config = make_config([dpo, job("sft", data_dir / "a.jsonl", max_steps=4)], monitor={"jsonl": {}})
    done = _run(config, "--nproc", "2", f"distributed.strategy={strategy}")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    alone = _one_process(config, host, tmp_path / "alone")
    _assert_same(out, tmp_path / "alone", ["dpo", "sft"], rtol=1e-5)
    ours = {j["name"]: j for j in _summary(out)["jobs"]}
    theirs = {j["name"]: j for j in alone["jobs"]}
    assert ours["dpo"]["preference_accuracy_after"] == theirs["dpo"]["preference_accuracy_after"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["jobs"]["dpo"]["rewards/margins"] for r in records if r["event"] == "step" and "dpo" in r["jobs"]]
    reference = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    expected = [r["jobs"]["dpo"]["rewards/margins"] for r in reference if r["event"] == "step" and "dpo" in r["jobs"]]
    assert rewards == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out + [g for c in out for g in _children(c)]


def _worker(launcher: int, rank: int) -> int:
    """The pid of the worker of ``rank`` under a ``--nproc`` launcher."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in _children(launcher):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def _long_jobs(data_dir: Path) -> list[dict[str, Any]]:
    return [
        job("quick", data_dir / "c.jsonl", max_steps=2),
        job("slow", data_dir / "a.jsonl", epochs=4, max_steps=40, lr=2e-3),
        job("wide", data_dir / "b.jsonl", epochs=4, max_steps=30, batch_size=6, micro_batch_size=3),
    ]


@pytest.mark.parametrize("strategy", ["rows", "jobs"])
def test_a_checkpoint_of_two_ranks_resumes_with_one_and_with_two(make_config, data_dir, host, tmp_path, strategy):
    config = make_config(_long_jobs(data_dir))
    _one_process(config, host, tmp_path / "alone")
    out = tmp_path / "out"
    proc = _start(config, "--nproc", "2", f"distributed.strategy={strategy}", "checkpoint_every=2")
    wait_for_checkpoint(out, proc, min_step=4)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to both workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert {j["status"] for j in _summary(out)["jobs"][1:]} == {"interrupted"}
    shutil.copytree(out, tmp_path / "copy")

    done = _run(config, "--resume", "--nproc", "2", f"distributed.strategy={strategy}")
    assert done.returncode == 0, done.stderr
    Engine(load_config(config, [f"output_dir={tmp_path / 'copy'}"]), host, resume=True).run()  # one process
    for resumed in (out, tmp_path / "copy"):
        assert [j["status"] for j in _summary(resumed)["jobs"]] == ["completed"] * 3
        _assert_same(resumed, tmp_path / "alone", ["quick", "slow", "wide"], rtol=1e-5)


def test_a_killed_rank_stops_the_run_with_its_name_then_resume_finishes(make_config, data_dir, host, tmp_path):
    config = make_config(_long_jobs(data_dir), distributed={"timeout_s": 60})
    out = tmp_path / "out"
    proc = _start(config, "--nproc", "2", "distributed.strategy=jobs", "checkpoint_every=2")
    wait_for_checkpoint(out, proc, min_step=4)
    started = time.monotonic()
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1
    assert "mlora: error: rank 1 died (SIGKILL)" in stderr and "--resume" in stderr
    assert not list(out.glob(".*.saving")) and not list((out / "checkpoints").glob("*.tmp"))

    done = _run(config, "--resume", "--nproc", "2", "distributed.strategy=jobs")
    assert done.returncode == 0, done.stderr
    assert [j["status"] for j in _summary(out)["jobs"]] == ["completed"] * 3
    _one_process(config, host, tmp_path / "alone")
    _assert_same(out, tmp_path / "alone", ["quick", "slow", "wide"])


@pytest.mark.parametrize("strategy", ["rows", "jobs"])
def test_a_diverging_job_fails_alone_on_every_rank(make_config, data_dir, tmp_path, strategy):
    jobs = _four_jobs(data_dir)
    jobs[1]["train"] |= {"lr": 1e30, "max_grad_norm": None, "max_steps": 6}  # its loss becomes inf or nan
    config = make_config(jobs)
    done = _run(config, "--nproc", "2", f"distributed.strategy={strategy}")
    assert done.returncode == 1, done.stderr  # a job failed; the run itself did not
    summary = _summary(tmp_path / "out")
    status = {j["name"]: (j["status"], j["error"]) for j in summary["jobs"]}
    assert status["b"][0] == "failed" and ("loss became" in status["b"][1] or "gradient norm" in status["b"][1])
    assert [status[n][0] for n in "acd"] == ["completed"] * 3
    assert [j["steps"] for j in summary["jobs"] if j["name"] != "b"] == [6, 3, 5]
    assert (tmp_path / "out" / "b" / "adapter_model.safetensors").is_file()  # its last good adapter
    assert "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_torchrun_nodes_train_one_config(make_config, data_dir, host, tmp_path):
    config = make_config(_four_jobs(data_dir))
    mlora = shutil.which("mlora", path=str(Path(sys.executable).parent))
    assert mlora is not None
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "mlora-test",
                mlora,
                "run",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stderr
    summary = _summary(tmp_path / "out")
    assert summary["distributed"]["world_size"] == 2
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 4
    _one_process(config, host, tmp_path / "alone")
    _assert_same(tmp_path / "out", tmp_path / "alone", list("abcd"))


def test_qlora_bases_under_jobs_each_rank_quantizing_its_own_copy(make_config, data_dir, host, tmp_path):
    config = make_config(_four_jobs(data_dir)[:2], base_model={"quantize": "nf4"})
    done = _run(config, "--nproc", "2", "distributed.strategy=jobs")
    assert done.returncode == 0, done.stderr
    assert _summary(tmp_path / "out")["base_model"]["quantize"] == "nf4"
    _one_process(config, host, tmp_path / "alone")
    _assert_same(tmp_path / "out", tmp_path / "alone", ["a", "b"])


def test_a_base_sharded_over_two_ranks_trains_as_one_process(make_config, data_dir, host, tmp_path):
    """FSDP2 per decoder block under rows. "solo" has one row per step, so in its steps rank 0
    has none and joins the collectives with a row that learns nothing; "early" stops early on
    held-out loss, which every rank measures together."""
    early = job("early", data_dir / "a.jsonl", max_steps=8, lr=5e-3, eval_every=2)
    early["train"]["early_stop"] = {"patience": 1, "min_delta": 10.0}  # stops at its second evaluation
    jobs = [job("solo", data_dir / "c.jsonl", max_steps=12, batch_size=1, micro_batch_size=1, lr=5e-3), early]
    config = make_config(jobs, distributed={"timeout_s": 60})
    done = _run(config, "--nproc", "2", "distributed.shard_base=true")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    summary = _summary(out)
    assert summary["distributed"]["shard_base"] is True and summary["distributed"]["strategy"] == "rows"
    alone = _one_process(config, host, tmp_path / "alone")
    _assert_same(out, tmp_path / "alone", ["solo", "early"], rtol=1e-5)
    for ours, theirs in zip(summary["jobs"], alone["jobs"], strict=True):
        assert (ours["status"], ours["steps"], ours["stopped_early"]) == (
            theirs["status"],
            theirs["steps"],
            theirs["stopped_early"],
        )
        assert ours["eval_loss_after"] == pytest.approx(theirs["eval_loss_after"], rel=1e-5)
    assert summary["jobs"][1]["stopped_early"] and summary["jobs"][1]["steps"] == 4


def test_a_sharded_bf16_base_trains_fp32_adapters_as_an_unsharded_one(make_config, data_dir, tmp_path):
    """FSDP2 wants one dtype per sharded unit: the adapters (fp32) are attached after the bf16
    blocks are sharded, so FSDP2 never manages them. Sharding gathers the very same weights,
    so the adapters equal those of the same rows run without sharding, bit for bit. (Against
    one process, bf16 rounding differs with how rows are grouped: up to 1e-2 relative after a
    few Adam steps on near-zero lora_B, the size of a real defect, so that is not the check.)"""
    config = make_config(_four_jobs(data_dir)[:2], base_model={"dtype": "bf16"})
    sharded = _run(config, "--nproc", "2", "distributed.shard_base=true")
    assert sharded.returncode == 0, sharded.stderr
    whole = _run(config, "--nproc", "2", "distributed.strategy=rows", f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert _summary(tmp_path / "out")["distributed"]["shard_base"] is True
    assert _summary(tmp_path / "whole")["distributed"]["shard_base"] is False
    _assert_same(tmp_path / "out", tmp_path / "whole", ["a", "b"], atol=0)
    for name in ("a", "b"):
        assert {v.dtype for v in _adapters(tmp_path / "out", [name])[name].values()} == {torch.float32}
