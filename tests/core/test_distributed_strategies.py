"""The pieces of distributed training that need no second process: strategy choice, placement,
row shares, merged step metrics, config checks, the launcher's failure report."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import job
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.distributed.launch import describe_exit, died_first
from mlora_core.distributed.strategies import JobsStrategy, RowsStrategy, choose_strategy
from mlora_core.distributed.world import World
from mlora_core.errors import ConfigError, MloraError
from mlora_core.training.run_stats import merge_ranks


@dataclass
class FakeJob:
    """What placement reads of a job."""

    name: str
    order: int
    remaining_tokens: int
    priority: int = 0
    micro_batch_size: int = 1


def test_auto_is_jobs_when_there_are_enough_jobs_for_the_ranks() -> None:
    assert choose_strategy("auto", jobs=4, ranks=2) == "jobs"
    assert choose_strategy("auto", jobs=2, ranks=2) == "jobs"
    assert choose_strategy("auto", jobs=1, ranks=2) == "rows"
    assert choose_strategy("rows", jobs=8, ranks=2) == "rows"
    assert choose_strategy("auto", jobs=1, ranks=1) == "jobs"
    assert choose_strategy("auto", jobs=4, ranks=2, shard_base=True) == "rows"


def _jobs(*work: int) -> list[FakeJob]:
    return [FakeJob(f"j{i}", i, w) for i, w in enumerate(work)]


def _place(strategy: JobsStrategy, jobs: list[FakeJob]) -> dict[str, int]:
    strategy.admit(jobs)  # type: ignore[arg-type]
    return dict(strategy.placed)


def test_jobs_are_placed_longest_first_on_the_least_loaded_rank() -> None:
    jobs = _jobs(10, 70, 40, 30, 20)
    placed = _place(JobsStrategy(World(rank=0, size=2), {j.name: j.order for j in jobs}, None), jobs)
    # longest first: 70 -> r0, 40 -> r1, 30 -> r1 (40 < 70), 20 -> r0 (70 = 70, lower rank), 10 -> r1
    assert placed == {"j1": 0, "j2": 1, "j3": 1, "j4": 0, "j0": 1}


def test_every_rank_places_alike_and_admits_only_its_own_jobs() -> None:
    jobs = _jobs(10, 70, 40, 30)
    orders = {j.name: j.order for j in jobs}
    mine = [{j.name for j in JobsStrategy(World(rank=r, size=2), orders, None).admit(jobs)} for r in (0, 1)]  # type: ignore[arg-type]
    assert mine[0] | mine[1] == set(orders) and not mine[0] & mine[1]


def test_a_job_admitted_later_goes_to_the_rank_with_room_and_least_remaining_work() -> None:
    jobs = _jobs(50, 40, 30, 5)
    strategy = JobsStrategy(World(rank=0, size=2), {j.name: j.order for j in jobs}, max_jobs=1)
    assert _place(strategy, jobs[:3]) == {"j0": 0, "j1": 1}  # one job per rank; j2 waits
    strategy.work |= {"j0": 45, "j1": 2}
    # j1 ended: rank 1 has room again, and j2 (the longest waiting) takes it
    placed = _place(strategy, [jobs[0], jobs[2], jobs[3]])
    assert placed["j2"] == 1 and "j3" not in placed
    # with no limit, a new job goes where the least work remains
    free = JobsStrategy(World(rank=0, size=2), {j.name: j.order for j in jobs}, None)
    _place(free, jobs[:2])
    free.work |= {"j0": 1, "j1": 39}
    assert _place(free, [jobs[0], jobs[1], jobs[3]])["j3"] == 0


def test_rows_shares_cover_every_row_once_even_when_uneven() -> None:
    rows = list(range(7))
    shares = [RowsStrategy(World(rank=r, size=3), {}, None).my_rows(rows) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 3]
    assert sum(shares, []) == rows
    assert RowsStrategy(World(rank=1, size=2), {}, None).my_rows([9]) == [9]  # rank 0 gets none
    assert RowsStrategy(World(rank=0, size=2), {}, None).my_rows([9]) == []
    assert RowsStrategy(World(rank=0, size=3), {}, None).rows_per_rank(7) == 3


def test_step_metrics_of_the_ranks_merge_into_the_step_s() -> None:
    a = {
        "step_time_s": 1.0,
        "rows": 2,
        "tokens": 100,
        "real_tokens": 80,
        "peak_memory_bytes": 5,
        "cpu_utilisation": 0.5,
    }
    b = {
        "step_time_s": 2.0,
        "rows": 1,
        "tokens": 100,
        "real_tokens": 40,
        "peak_memory_bytes": 9,
        "cpu_utilisation": 0.7,
    }
    merged = merge_ranks([a, b])
    assert merged["step_time_s"] == 2.0 and merged["rows"] == 3 and merged["tokens"] == 200
    assert merged["padding_fraction"] == pytest.approx(0.4) and merged["peak_memory_bytes"] == 9
    assert merged["cpu_utilisation"] == pytest.approx(0.6)


def test_distributed_section_is_checked(make_config, data_dir, host) -> None:
    path = make_config([job("a", data_dir / "a.jsonl")])
    bad = [
        "distributed.strategy=pipes",
        "distributed.backend=nccl",
        "distributed.timeout_s=0",
        "distributed.shard_base=true",
    ]
    with pytest.raises(ConfigError) as caught:
        validate_config(load_config(path, bad), host)
    problems = "\n".join(caught.value.problems)
    assert "distributed.strategy: 'pipes' is not one of auto, jobs, rows" in problems
    assert "distributed.backend: nccl needs a CUDA device" in problems
    assert "distributed.timeout_s: must be positive" in problems
    validate_config(load_config(path, ["distributed.strategy=rows", "distributed.shard_base=true"]), host)
    sharded = ["distributed.shard_base=true", "distributed.strategy=jobs", "base_model.quantize=nf4"]
    with pytest.raises(ConfigError) as caught:
        validate_config(load_config(path, [*sharded, "base_model.activation_checkpointing=true"]), host)
    problems = "\n".join(caught.value.problems)
    assert "distributed.shard_base: needs strategy rows" in problems
    assert "distributed.shard_base: a quantized base cannot be sharded" in problems
    assert "distributed.shard_base: not supported together with base_model.activation_checkpointing" in problems


def test_the_launcher_names_the_rank_that_died_not_those_that_lost_it() -> None:
    lost = ProcessFailure(local_rank=0, pid=10, exitcode=2, error_file="")
    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="")
    assert died_first({0: lost, 1: killed})[0] == 1
    assert describe_exit(-9) == "died (SIGKILL)" and describe_exit(3) == "exited with code 3"


def test_nproc_is_refused_inside_a_launched_world(make_config, data_dir, monkeypatch, capsys) -> None:
    from mlora_core.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(make_config([job("a", data_dir / "a.jsonl")])), "--nproc", "2"]) == 2
    assert "already one of several" in capsys.readouterr().err


def test_each_rank_takes_its_own_gpu_and_its_share_of_the_node_s_ram() -> None:
    world = World(rank=1, size=4, local_rank=1, local_size=2)
    assert world.device("cuda") == "cuda:1" and world.device("cpu") == "cpu"
    with pytest.raises(MloraError, match="use 'cuda'"):
        world.device("cuda:0")
    assert World().device("cuda:3") == "cuda:3"  # one process: as configured
    assert world.memory_share(1000, "cpu") == 500 and world.memory_share(1000, "cuda:1") == 1000
    assert world.memory_share(None, "cpu") is None
