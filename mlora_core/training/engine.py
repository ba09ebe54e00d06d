"""The training loop: plan -> batch -> one forward -> per-job loss -> one backward -> per-job step.

Adapters share no parameters and each job's loss reads only its own rows, so backpropagating
the sum of the job losses once gives every adapter exactly its own job's gradient.

The engine owns the loop; its parts live next to it: :class:`~.job.Job` (a job's data order,
optimizer and counters), :class:`~.run_directory.RunDirectory` (output dir, adapters,
checkpoints), :class:`~.held_out.HeldOutEvaluator` (held-out metrics), :class:`~.run_stats.RunStats`
(totals) and :class:`~mlora_core.events.RunEvents` (monitors and hooks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlora_core.config.schema import JobConfig, MloraConfig, job_config_from_dict, to_dict
from mlora_core.config.validation import validate_config
from mlora_core.distributed.report import StepReport
from mlora_core.distributed.sharding import shard_blocks
from mlora_core.distributed.strategies import Strategy, choose_strategy, make_strategy
from mlora_core.distributed.world import World, join_world, raised_by_collective
from mlora_core.errors import Interrupted, MloraError
from mlora_core.events import RunEvents
from mlora_core.models.loading import load_base_model
from mlora_core.models.recompute import checkpoint_blocks
from mlora_core.models.saved_adapters import load_adapter
from mlora_core.plugin_api.conventions import pad_token_id
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import LoadedModel, Sample, SequenceLogps, SplitDataset
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.plugin_api.scheduling import StepBudget
from mlora_core.training.batch import MultiJobBatch, build_batch, build_packed_batch
from mlora_core.training.held_out import HeldOutEvaluator, Results
from mlora_core.training.job import INTERRUPTED, RUNNING, Job
from mlora_core.training.loss import learned_token_losses, per_job_sequence_logps
from mlora_core.training.memory import MemoryModel, device_memory_limit, reset_step_peak, step_peak
from mlora_core.training.reference import with_reference_logps
from mlora_core.training.run_directory import RunDirectory, load_engine_state, load_job_state
from mlora_core.training.run_stats import RunStats, merge_ranks, step_metrics
from mlora_core.training.summary import job_entry, run_summary
from mlora_core.training.utilisation import UtilisationMeter

#: A job's part of a step: (its share of the optimizer batch's loss, its non-pad tokens,
#: its objective's metric sums), on this rank.
StepLoss = tuple[torch.Tensor, int, dict[str, torch.Tensor]]
#: The same over every rank, as numbers.
StepTotal = tuple[float, int, dict[str, float]]
#: Called at every step boundary (before each step, and once more when no job is live); it
#: may add jobs (:meth:`Engine.add_job`) and stop them (:meth:`Engine.stop_job`).
BetweenSteps = Callable[["Engine"], None]


class Engine:
    """Trains every job of a config together over one base model.

    In a distributed run (``mlora run --nproc N``, torchrun) every rank runs this engine in
    lockstep; the :class:`~mlora_core.distributed.strategies.Strategy` says which jobs and
    rows each rank trains, and the ranks exchange a :class:`StepReport` after each step.
    """

    def __init__(
        self,
        config: MloraConfig,
        host: PluginHost,
        *,
        resume: bool = False,
        overwrite: bool = False,
        between_steps: BetweenSteps | None = None,
    ) -> None:
        validate_config(config, host)  # before anything loads or is written
        self.world: World = join_world(config.distributed, config.base_model.device)
        self.device = self.world.device(config.base_model.device)
        if self.device != config.base_model.device:
            config = dataclasses.replace(config, base_model=dataclasses.replace(config.base_model, device=self.device))
        self.config, self.host = config, host
        self.resume, self.overwrite = resume, overwrite
        self.between_steps = between_steps
        #: Jobs added while running (:meth:`add_job`), in order; a checkpoint lists them.
        self.added: list[JobConfig] = []
        #: Measure exact-match accuracy too at ``eval_every`` (jobs with ``exact_match`` data).
        self.accuracy_during = False
        #: A job was added or stopped since the last checkpoint.
        self._jobs_changed = False
        self.resumed = False
        #: A stop signal this process received, and the first one any rank received (known to
        #: every rank after the same exchange).
        self.stop_signal: str | None = None
        self.stop_agreed: str | None = None
        self.run_dir = RunDirectory(Path(config.output_dir))
        self.router = RowRouter()
        self.scheduler = host.schedulers.create(config.scheduler.type, config=config.scheduler)
        shard = config.distributed.shard_base and self.world.distributed
        name = choose_strategy(config.distributed.strategy, len(config.jobs), self.world.size, shard)
        orders = {jc.name: i for i, jc in enumerate(config.jobs)}
        self.strategy: Strategy = make_strategy(name, self.world, orders, config.scheduler.max_concurrent_jobs)
        self.strategy.collective_forward = shard
        limit = config.scheduler.memory_limit
        if limit is None:
            limit = self.world.memory_share(device_memory_limit(self.device), self.device)
        self.memory = MemoryModel(limit=limit or None)
        tokens = config.scheduler.max_tokens_per_step
        self.budget = StepBudget(
            max_tokens=tokens * self.strategy.step_ranks if tokens else None,
            fits=lambda rows, width: self.memory.fits(self.strategy.rows_per_rank(rows), width),
            packing=bool(config.scheduler.packing),
            pack_length=config.scheduler.pack_length,
        )
        self.utilisation = UtilisationMeter(self.device)
        self.stats = RunStats()
        self.steps = 0
        #: job -> its summary.json entry, once it has ended
        self.results: dict[str, dict[str, Any]] = {}
        #: job -> {"eval_loss": ..., "accuracy": ...} before training (None: not measured)
        self.eval_before: Results = {}
        self.jobs: list[Job] = []
        self.report = StepReport()
        #: Highest step peak of each rank, its seconds in collectives and in held-out
        #: evaluation (as last reported).
        self.rank_peaks = [0] * self.world.size
        self.rank_collective_s = [0.0] * self.world.size
        self.rank_eval_s = [0.0] * self.world.size

    # --- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the base model, attach every job's adapter, resume if asked, start the monitors."""
        self._started = time.perf_counter()
        claim = lambda: self.run_dir.claim(resume=self.resume, overwrite=self.overwrite)  # noqa: E731
        checkpoint = self.world.on_main(claim)  # one rank clears an earlier run
        limits = self.world.all_gather(self.memory.limit)  # ranks plan alike: the smallest limit
        self.memory.limit = None if None in limits else min(limits)  # type: ignore[type-var]
        self._load()
        self.run_dir.create()
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.world.distributed:  # each rank its own dropout masks (derived alike on every rank)
            torch.manual_seed(int(torch.randint(2**62, (1,))) + self.world.rank)
        self.events = RunEvents(self.host, self.config, resume=self.resumed, emit=self.world.is_main, hold=True)
        if self.world.distributed and self.world.is_main:
            print(f"mlora: {self.world.size} ranks ({self.world.backend}), strategy {self.strategy.name!r}", flush=True)

    def _load(self) -> None:
        self.loaded: LoadedModel = load_base_model(self.host, self.config.base_model)
        self.model = self.loaded.model
        self.model.train()
        if self.config.base_model.activation_checkpointing:
            if not self.loaded.blocks:
                raise MloraError(
                    f"base_model.activation_checkpointing: backend {self.config.base_model.backend!r} "
                    "does not name its transformer blocks (LoadedModel.blocks)"
                )
            checkpoint_blocks(self.loaded.blocks, self.router)
        if self.strategy.collective_forward:  # before adapters attach: FSDP2 manages only the base
            shard_blocks(self.loaded.blocks, self.world, self.device)
        self.pad_id = pad_token_id(self.loaded.tokenizer)
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if isinstance(hidden, int):  # packed rows: how much longer rows cost (plugin_api.packing.step_cost)
            self.budget = dataclasses.replace(self.budget, attention_parity=6 * hidden)
        self.evaluator = HeldOutEvaluator(self.loaded, self.router, self.pad_id, self.device)
        self.jobs = [self._make_job(i, jc) for i, jc in enumerate(self.config.jobs)]

    def _make_job(self, order: int, jc: JobConfig) -> Job:
        objective = self.host.objectives.create(jc.objective.type, config=jc.objective)
        data = self.host.data_loaders.create(jc.data.type).load(jc.data, self.loaded.tokenizer, jc.train.seed)
        check_sequences(jc, data, objective.sequences_per_sample)
        torch.manual_seed(jc.train.seed)  # adapter init depends on the job's seed only
        adapter = self.host.adapters.create(jc.adapter.type).attach(self.model, jc.name, jc.adapter, self.router)
        job = Job(order, jc, adapter, data, objective)
        if objective.sequences_per_sample > 1 or objective.needs_reference:
            job.data = self._with_reference(jc, data, job.batches if objective.needs_reference else [])
        return job

    def add_job(self, jc: JobConfig) -> Job:
        """Add a job to the running engine, at a step boundary (from :data:`BetweenSteps`).

        The job is validated like a config's job, built (data, adapter, reference), measured
        on its held-out data and trains from the next step, admitted like any other job.
        Single process only.

        Raises:
            MloraError: the job is invalid, its name is taken, or its data cannot be loaded.
        """
        if self.world.distributed:
            raise MloraError("jobs can be added to a running engine only in a single process")
        if any(j.name == jc.name for j in self.jobs):
            raise MloraError(f"job name {jc.name!r} is taken")
        validate_config(dataclasses.replace(self.config, jobs=[jc]), self.host)
        job = self._append_job(jc)
        self.events.run["jobs"].append(jc.name)
        self.events.run["config"]["jobs"].append(to_dict(jc))
        job.started = time.perf_counter()
        try:
            before = self.evaluator.metrics([job])
        except Exception as exc:
            job.fail(f"held-out evaluation before training failed: {exc!r}")
            self._finish(job, save=False)
            return job
        self.eval_before |= before
        self.events.evaluation(self.steps, "before", {jc.name: (0, before[jc.name])})
        return job

    def _append_job(self, jc: JobConfig) -> Job:
        job = self._make_job(len(self.jobs), jc)
        self.jobs.append(job)
        self.added.append(jc)
        self.config = dataclasses.replace(self.config, jobs=[*self.config.jobs, jc])
        self.strategy.orders[jc.name] = job.order
        self._jobs_changed = True
        return job

    def stop_job(self, name: str, status: str, reason: str) -> None:
        """End a running job now, at a step boundary, as ``status`` (``pruned``, ``cancelled``, ...).

        Its adapter as of its last optimizer step (a half-accumulated optimizer batch is
        dropped) is saved and evaluated like a completed job's; ``reason`` becomes its error.
        """
        job = next(j for j in self.jobs if j.name == name)
        if job.status != RUNNING:
            return
        job.rewind_batch()
        job.progress.status, job.progress.error = status, reason
        self._finish(job)
        self._jobs_changed = True

    def flush_events(self) -> None:
        """Emit the events held since the last step (those of jobs added or stopped between
        steps) now, rather than after the next step, which may not come soon."""
        if not self.world.distributed:
            self.events.replay(self.events.take_pending())

    def _with_reference(self, jc: JobConfig, data: SplitDataset, batches: list[list[int]]) -> SplitDataset:
        """``data`` with reference log-probabilities: of the held-out samples always (preference
        accuracy compares with the base), of the training samples in ``batches`` (the job's
        optimizer batches when its objective needs them; ``max_steps`` may leave samples out).
        ``objective.reference``: ``base``, or a saved adapter attached for this and detached after."""
        where = jc.objective.reference
        name = None if where == "base" else f"reference_{jc.name}"
        reference = None if name is None else load_adapter(self.host, self.model, name, where, self.router)
        used = sorted({i for batch in batches for i in batch})

        def fill(samples: list[Sample]) -> list[Sample]:
            return with_reference_logps(self.loaded, self.router, samples, self.pad_id, self.device, name)

        started = time.perf_counter()
        if self.world.is_main:
            count = len(used) + len(data.eval)
            print(f"mlora: [{jc.name}] reference log-probabilities of {count} samples ({where})...", flush=True)
        try:
            train_samples = list(data.train)
            for i, sample in zip(used, fill([train_samples[i] for i in used]), strict=True):
                train_samples[i] = sample
            filled = SplitDataset(train_samples, fill(data.eval))
        finally:
            if reference is not None:
                reference.detach()
        if self.world.is_main:
            print(f"mlora: [{jc.name}] reference done in {time.perf_counter() - started:.1f} s", flush=True)
        return filled

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """:meth:`setup`, then :meth:`train`."""
        try:
            self.setup()
            summary = self.train()
            self.world.barrier()  # no rank tears down its connections while another still works
            return summary
        except RuntimeError as exc:
            if self.world.distributed and raised_by_collective(exc):  # inside the model (FSDP2)
                raise self.world.lost(exc) from exc
            raise
        finally:
            self.world.close()

    def request_stop(self, signal_name: str) -> None:
        """Stop at the next step boundary, after checkpointing every unfinished job."""
        self.stop_signal = signal_name

    def train(self) -> dict[str, Any]:
        """Train every job to completion (or failure), write summary.json and return it."""
        try:
            self.events.train_start()
            if not self.resumed:
                self._evaluate_before()
            train_started = time.perf_counter() - self.stats.train_elapsed
            for job in self.jobs:
                job.started = train_started
            try:
                self._loop(train_started)
            except BaseException as exc:  # record every job's state, then let it propagate
                together = isinstance(exc, Interrupted)  # every rank stopped at the same step
                if not together:
                    self._fail_running("interrupted" if isinstance(exc, KeyboardInterrupt) else f"run failed: {exc}")
                self._end(train_started, together=together)
                raise
            return self._end(train_started)
        finally:
            self.events.close()

    def _loop(self, train_started: float) -> None:
        while True:
            if not self.world.distributed:
                self.stop_agreed = self.stop_signal
            if self.stop_agreed and self._live():  # every rank learns of a stop at the same exchange
                raise Interrupted(self.stop_agreed, self._interrupt(train_started))
            if self.between_steps is not None:
                self._jobs_changed = False
                self.between_steps(self)
                self.flush_events()
                if self._jobs_changed and self.config.checkpoint_every:
                    self._checkpoint(train_started)
            live = self._live()
            if not live:
                return
            self._step(live)
            ended = any(j.status != RUNNING for j in live)  # the same on every rank
            every = self.config.checkpoint_every
            if every and (ended or self.steps % every == 0):
                self._checkpoint(train_started)

    def _live(self) -> list[Job]:
        return [j for j in self.jobs if j.status == RUNNING]

    def _step(self, live: list[Job]) -> None:
        """One engine step, top to bottom, then the exchange with the other ranks."""
        planned = self._plan(live)
        self.steps += 1
        if planned:
            self._train_step(planned)
        self._exchange(step_ran=True)

    def _train_step(self, planned: list[tuple[Job, int]]) -> None:
        chosen = [job for job, _ in planned]
        started = time.perf_counter()
        self.utilisation.start()
        taken = [(job.name, job.take(rows)) for job, rows in planned]
        batch = self._batch([(name, self.strategy.my_rows(samples)) for name, samples in taken])
        reset_step_peak(self.device)
        out_of_memory = False
        try:
            if batch is None and self.strategy.collective_forward:  # join the others' collectives
                self._forward_backward(self._batch([(taken[0][0], taken[0][1][:1])]), learn=False)
            losses = self._forward_backward(batch)
        except torch.OutOfMemoryError:
            losses, out_of_memory = {}, True
        totals = self._step_totals(chosen, batch, losses, out_of_memory)
        if totals is None:
            self._recover_from_oom(chosen, batch)
            return
        seconds = time.perf_counter() - started
        self.report.metrics |= self._step_optimizers(chosen, totals, seconds)
        if batch is not None:  # the step's time includes the optimizer steps
            self.report.run = self._record_step(chosen, batch, time.perf_counter() - started)
        self._evaluate_during([job for job in chosen if job.eval_due() and self._evaluates(job)])
        for job in chosen:
            if job.status != RUNNING:
                self._finish(job)

    # --- the parts of a step ----------------------------------------------------------------

    def _plan(self, live: list[Job]) -> list[tuple[Job, int]]:
        """Admit jobs by priority and ask the scheduler for this step's rows per job.

        Every rank computes the same ready jobs; the strategy gives this rank's share (an
        empty plan: this rank trains nothing this step).
        """
        ready = [j for j in live if j.start_step <= self.steps]
        if not ready:  # every live job starts later: skip ahead to the first start
            self.steps = min(j.start_step for j in live)
            ready = [j for j in live if j.start_step <= self.steps]
        admitted = self.strategy.admit(ready)
        if not admitted:
            return []
        plan = dict(self.scheduler.plan(admitted, self.budget))
        unknown = set(plan) - {j.name for j in admitted}
        if not plan or unknown:
            raise MloraError(
                f"scheduler {self.config.scheduler.type!r} planned {plan or 'nothing'}"
                f"{f'; jobs not admitted: {sorted(unknown)}' if unknown else ''}"
            )
        for job in admitted:
            job.progress.waited = 0 if job.name in plan else job.progress.waited + 1
        by_name = {j.name: j for j in admitted}
        return [(by_name[name], rows) for name, rows in plan.items()]

    def _batch(self, parts: list[tuple[str, list[Sample]]]) -> MultiJobBatch | None:
        """This rank's rows of the step as one batch (None: it has no rows this step)."""
        local = [(name, samples) for name, samples in parts if samples]
        if not local:
            return None
        budget = self.budget  # the schedulers planned this step with the same packing settings
        if budget.packing:
            return build_packed_batch(local, self.pad_id, budget.pack_length, budget.attention_parity).to(self.device)
        return build_batch(local, self.pad_id).to(self.device)

    def _forward_backward(self, batch: MultiJobBatch | None, learn: bool = True) -> dict[str, StepLoss]:
        """One forward over this rank's rows, per-job losses, one backward of their finite sum.

        Returns per job: (its rows' share of the optimizer batch's loss, their non-pad tokens,
        its objective's metric sums over them).
        ``learn=False``: a row that only takes part in a sharded base's collectives; its
        backward adds exact zeros to the adapter's gradients, and nothing is returned.
        """
        if batch is None:
            return {}
        with self.router.route(batch.segments, by_tokens=batch.packed):
            token_losses = learned_token_losses(self.loaded, batch)  # (learned positions,)
        sequences = per_job_sequence_logps(batch, token_losses)  # job -> (log-probs, tokens), (S, K)
        by_name = {j.name: j for j in self.jobs}
        losses = {}
        for seg, tokens, reference in zip(batch.segments, batch.segment_tokens, batch.reference_logps, strict=True):
            assert seg.adapter is not None
            logps, counts = sequences[seg.adapter]
            loss, metrics = by_name[seg.adapter].loss(SequenceLogps(logps, counts, reference))
            losses[seg.adapter] = (loss, tokens, metrics)
        stacked = torch.stack([loss for loss, _, _ in losses.values()])  # (jobs,)
        finite = torch.isfinite(stacked.detach()).tolist()  # one device sync for every job
        if any(finite):
            total = stacked[torch.tensor(finite, device=stacked.device)].sum()
            (total if learn else total * 0).backward()  # type: ignore[no-untyped-call]
        return losses if learn else {}

    def _step_totals(
        self,
        chosen: list[Job],
        batch: MultiJobBatch | None,
        losses: dict[str, StepLoss],
        out_of_memory: bool,
    ) -> dict[str, StepTotal] | None:
        """Per job: (loss, non-pad tokens, objective metric sums) of the step over every rank;
        None: a rank ran out of memory.

        Under ``rows`` this is the step's one collective: the values are summed over the ranks,
        so every rank sees the same losses (and fails a diverging job at the same step).
        """
        n = len(chosen)
        names = [job.objective.metric_names for job in chosen]  # alike on every rank
        offsets = [2 * n + 2 + sum(len(m) for m in names[:i]) for i in range(n)]
        values = torch.zeros(2 * n + 2 + sum(len(m) for m in names), dtype=torch.float64)
        mine = [i for i, job in enumerate(chosen) if job.name in losses]
        if mine:  # one device sync for every job's loss and metrics
            local = [losses[chosen[i].name][0].detach() for i in mine]
            local += [losses[chosen[i].name][2][m].detach() for i in mine for m in names[i]]
            stacked = torch.stack(local).double().cpu()
            values[mine] = stacked[: len(mine)]
            slots = [offsets[i] + k for i in mine for k in range(len(names[i]))]
            values[slots] = stacked[len(mine) :]
            values[[n + i for i in mine]] = torch.tensor([losses[chosen[i].name][1] for i in mine], dtype=torch.float64)
        values[2 * n] = float(out_of_memory)
        values[2 * n + 1] = float(out_of_memory and batch is not None and batch.samples == 1)
        values = self.strategy.reduce_step(values)
        if values[2 * n] > 0:
            self._oom_on_one_row = bool(values[2 * n + 1] > 0)
            return None
        totals: dict[str, StepTotal] = {}
        for i, job in enumerate(chosen):
            loss = float(values[i])
            if torch.isfinite(values[i]):
                metrics = {m: float(values[offsets[i] + k]) for k, m in enumerate(names[i])}
                totals[job.name] = (loss, int(values[n + i]), metrics)
            else:
                job.fail(f"loss became {loss} at step {job.progress.step + 1}", revert=True)
        return totals

    def _record_step(self, chosen: list[Job], batch: MultiJobBatch, seconds: float) -> dict[str, float]:
        """This rank's run metrics of the step; its peak memory goes to the exchange, so that
        every rank's memory model learns from every rank's steps alike."""
        rows, width = batch.input_ids.shape
        peak = step_peak(self.device)
        self.report.observed = (rows, width, peak)
        for job in chosen:
            job.progress.peak_memory_bytes = max(job.progress.peak_memory_bytes, peak)
        return {**step_metrics(batch, peak, seconds), **self.utilisation.read(seconds)}

    def _step_optimizers(
        self, chosen: list[Job], totals: dict[str, StepTotal], seconds: float
    ) -> dict[str, dict[str, float]]:
        """Each job that took part records its rows; those whose optimizer batch is complete step.

        Returns the metrics of the owned jobs that stepped.
        """
        stepping = []
        for job in chosen:
            if job.name in totals:
                loss, tokens, sums = totals[job.name]
                job.record_rows(loss, tokens, seconds, sums)
                if job.batch_complete:
                    stepping.append(job)
        self.strategy.reduce_gradients(stepping)
        metrics: dict[str, dict[str, float]] = {}
        for job in stepping:
            try:
                step_metrics_ = job.optimizer_step()
            except FloatingPointError as exc:
                job.fail(f"{exc} at step {job.progress.step + 1}")
                continue
            if self.strategy.owns(job.name):
                metrics[job.name] = step_metrics_
        return metrics

    def _recover_from_oom(self, chosen: list[Job], batch: MultiJobBatch | None) -> None:
        """Out of memory mid-step (on any rank): redo the jobs' current optimizer batches in
        smaller steps.

        Rewinding a job's whole optimizer batch drops any half-accumulated gradient, so the
        result equals a run that never ran out of memory.
        """
        if batch is not None:
            rows, width = batch.input_ids.shape
            self.report.out_of_memory = (rows, width)  # into every rank's memory model
        del batch
        for job in chosen:
            job.rewind_batch()
            if self._oom_on_one_row:
                job.fail("out of memory on a single row")
                self._finish(job)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stats.oom_retries += 1

    # --- the exchange between ranks -----------------------------------------------------------

    def _exchange(self, step_ran: bool) -> None:
        """Share this rank's :class:`StepReport`, apply the others', emit the step's events.

        In a single process this only emits the events; in a distributed run it is the one
        control message per step, and every rank leaves it knowing every job's status.
        """
        report = self.report
        self.report = StepReport()
        report.events = self.events.take_pending()
        report.stop = self.stop_signal
        report.collective_s = self.world.collective_s
        report.eval_s = self.evaluator.seconds
        for job in self.jobs:
            if self.strategy.owns(job.name):
                report.statuses[job.name] = (job.status, job.progress.error)
                if job.status == RUNNING:
                    report.work[job.name] = job.remaining_tokens
        reports = self.world.all_gather(report)
        for r in reports:
            self.results |= r.results
            self.eval_before |= r.eval_before
            self.strategy.work |= r.work
            self.stop_agreed = self.stop_agreed or r.stop
        self._apply_statuses(reports)
        ran = [r.run for r in reports if r.run is not None]
        for rank, r in enumerate(reports):  # in rank order: the same model on every rank
            self.rank_collective_s[rank], self.rank_eval_s[rank] = r.collective_s, r.eval_s
            if r.observed is not None:
                self.memory.observe(*r.observed)
            if r.out_of_memory is not None:
                self.memory.record_oom(*r.out_of_memory)
            if r.run is not None:
                self.rank_peaks[rank] = max(self.rank_peaks[rank], int(r.run["peak_memory_bytes"]))
        if step_ran and ran:
            run_metrics = merge_ranks(ran)
            self.stats.record_step(run_metrics)
            metrics = {name: m for r in reports for name, m in r.metrics.items()}
            self.events.step_end(self.steps, metrics, run_metrics)
        for r in reports:
            self.events.replay(r.events)

    def _apply_statuses(self, reports: list[StepReport]) -> None:
        """Jobs owned elsewhere take their owner's status; those that ended are freed here."""
        by_name = {j.name: j for j in self.jobs}
        for r in reports:
            for name, (status, error) in r.statuses.items():
                job = by_name[name]
                if self.strategy.owns(name) or job.status == status:
                    continue
                job.progress.status, job.progress.error = status, error
                if status != RUNNING:
                    job.release()
        for job in self.jobs:  # a job placed on another rank is not kept here
            if job.status == RUNNING and job.params and not self.strategy.holds(job.name):
                job.release()

    # --- held-out evaluation ----------------------------------------------------------------

    def _evaluates(self, job: Job) -> bool:
        """Whether this rank measures ``job`` on held-out data: its owner does, and with a
        sharded base every rank does (each evaluation's forwards are collectives); only the
        owner reports."""
        return self.strategy.collective_forward or self.strategy.owns(job.name)

    def _evaluate_before(self) -> None:
        """Held-out metrics of the owned jobs before training; a job whose evaluation raises fails alone."""
        measured_here = [j for j in self.jobs if self._evaluates(j)]
        try:
            before = self.evaluator.metrics(measured_here)
        except Exception:  # find the job at fault: evaluate each alone
            before = {}
            for job in measured_here:
                try:
                    before |= self.evaluator.metrics([job])
                except Exception as exc:
                    job.fail(f"held-out evaluation before training failed: {exc!r}")
                    self._finish(job, save=False)
        before = {name: values for name, values in before.items() if self.strategy.owns(name)}
        self.eval_before |= before
        self.report.eval_before = before
        measured = [j for j in self.jobs if j.name in before]
        self.events.evaluation(0, "before", {j.name: (0, before[j.name]) for j in measured})
        self._exchange(step_ran=False)
        self.stats.eval_before_s = self._eval_seconds()

    def _eval_seconds(self) -> float:
        """Seconds of held-out evaluation so far: the ranks evaluate side by side, in lockstep,
        so the slowest rank's time is the run's."""
        return max(self.evaluator.seconds, *self.rank_eval_s)

    def _evaluate_during(self, jobs: list[Job], final: bool = False) -> None:
        """``eval_every``: held-out loss of the current weights, fed to early stopping.

        ``final``: the job has ended; its last weights are compared with the best, not reported.
        """
        if not jobs:
            return
        accuracy = [j for j in jobs if self.accuracy_during and not final and j.config.data.exact_match]
        results: Results = self.evaluator.metrics(accuracy) if accuracy else {}
        losses = self.evaluator.losses([j for j in jobs if j.name not in results])
        results |= {name: {"eval_loss": loss} for name, loss in losses.items()}
        for job in jobs:
            loss = results[job.name]["eval_loss"]
            if loss is not None:
                job.record_eval(loss)
        owned = [j for j in jobs if self.strategy.owns(j.name)]
        if not final and owned:
            self.events.evaluation(self.steps, "during", {j.name: (j.progress.step, results[j.name]) for j in owned})

    # --- a job's end -------------------------------------------------------------------------

    def _finish(self, job: Job, save: bool = True) -> None:
        """Save and evaluate a job that has ended (on its owner), then free it.

        A failed job keeps its last good adapter (the weights before the step that broke it),
        saved and evaluated like a completed one; its status and error say what happened.
        If saving or evaluating raises, the job fails with that error and the run goes on.
        """
        owner = self.strategy.owns(job.name)
        after: dict[str, float | None] = {}
        adapter_dir = None
        if save and job.status != INTERRUPTED and self._evaluates(job):
            adapter_dir, after, error = self._save_and_evaluate(job, write=owner)
            if error is not None:
                job.fail(f"{job.progress.error}; {error}" if job.progress.error else error)
        job.release()
        if not owner:
            return
        self._record_result(job, after, adapter_dir)
        self.events.job_end(job.name, self.results[job.name])

    def _record_result(self, job: Job, after: dict[str, float | None], adapter_dir: str | None) -> None:
        self.results[job.name] = job_entry(job, self.eval_before.get(job.name, {}), after, adapter_dir)
        self.report.results[job.name] = self.results[job.name]

    def _save_and_evaluate(
        self, job: Job, write: bool = True
    ) -> tuple[str | None, dict[str, float | None], str | None]:
        """(adapter dir or None, held-out results, what went wrong or None) for a job that has ended.

        ``write``: save the adapter and report (the job's owner); other ranks only take part in
        the evaluations of a sharded base.
        """
        adapter_dir = None
        doing = "choosing the best adapter"
        try:
            if job.config.train.early_stop is not None and job.history.last_eval_step != job.progress.step:
                self._evaluate_during([job], final=True)  # the last weights may be the best
            job.use_best()
            doing = "held-out evaluation after training"
            after = self.evaluator.metrics([job])[job.name]
            doing = "saving the adapter"
            if write:
                adapter_dir = self.run_dir.save_adapter(job.name, job.adapter, self.loaded.name_or_path)
        except Exception as exc:  # this job's end failed; the others must not notice
            return adapter_dir, {}, f"{doing} failed: {exc!r}"
        if write:
            self.events.evaluation(self.steps, "after", {job.name: (job.progress.step, after)})
        return adapter_dir, after, None

    def _fail_running(self, reason: str) -> None:
        for job in self.jobs:
            if job.status == RUNNING:
                job.fail(reason)
                job.release()
                self._record_result(job, {}, None)
                self.events.job_end(job.name, self.results[job.name])

    # --- checkpoints and the end ---------------------------------------------------------------

    def _checkpoint(self, train_started: float) -> Path:
        """Checkpoint every unfinished job and the engine (every rank calls this at the same step)."""
        self.stats.train_elapsed = time.perf_counter() - train_started
        state = {
            **self.stats.state(),
            "eval_s": self.evaluator.seconds,
            "steps": self.steps,
            "eval_before": self.eval_before,
            "results": self.results,
            "memory": {"observations": self.memory.observations, "oom_tokens": self.memory.oom_tokens},
            "added_jobs": [to_dict(jc) for jc in self.added],
        }
        tmp = self.world.on_main(lambda: self.run_dir.begin_checkpoint(self.steps))
        for job in self.jobs:
            if job.status == RUNNING:
                grads = self.strategy.checkpoint_gradients(job)
                if self.strategy.owns(job.name):
                    self.run_dir.write_job(tmp, job, grads)
        self.world.barrier()
        return self.world.on_main(lambda: self.run_dir.commit_checkpoint(tmp, state))

    def _restore(self, directory: Path) -> None:
        state = load_engine_state(directory)
        self.stats = RunStats.from_state(state)
        self.evaluator.seconds = state["eval_s"]
        self.steps = state["steps"]
        self.eval_before, self.results = state["eval_before"], state["results"]
        for rows, length, peak in state["memory"]["observations"]:
            self.memory.observe(rows, length, peak)
        self.memory.oom_tokens = state["memory"]["oom_tokens"]
        for added in state.get("added_jobs", []):  # jobs added while running, as they were
            self._append_job(job_config_from_dict(added))
        for job in self.jobs:
            if job.name in self.results:  # finished before the checkpoint: not trained again
                job.progress.status = self.results[job.name]["status"]
                job.release()
            else:
                gradients = self.strategy.keeps_restored_gradients(job.name)
                job.restore(*load_job_state(directory, job.name), gradients=gradients)
        self.resumed = True

    def _interrupt(self, train_started: float) -> str:
        """Checkpoint every unfinished job, mark them interrupted; returns the message for the user."""
        where = self._checkpoint(train_started)
        for job in self.jobs:
            if job.status == RUNNING:
                job.progress.status, job.progress.error = INTERRUPTED, f"stopped by {self.stop_agreed}"
                if self.strategy.owns(job.name):
                    self._record_result(job, {}, None)
        return f"stopped by {self.stop_agreed} at step {self.steps}; checkpoint in {where}; continue with --resume"

    def _end(self, train_started: float, together: bool = True) -> dict[str, Any]:
        """Write summary.json and tell the monitors and hooks the run has ended.

        ``together``: every rank got here at the same step (the last exchange gathers every
        job's result); otherwise this rank writes what it knows (the run failed).
        """
        if together:
            self._exchange(step_ran=False)
        else:
            self.events.replay(self.events.take_pending())
        now = time.perf_counter()
        entries = [
            self.results.get(j.name) or job_entry(j, self.eval_before.get(j.name, {}), {}, None) for j in self.jobs
        ]
        train_tokens = sum(e["train_tokens"] for e in entries)
        loop_s = now - train_started
        totals = self.stats.totals(
            self.device, now - self._started, loop_s, self._eval_seconds(), train_tokens, self.steps
        )
        facts: dict[str, Any] = {
            "output_dir": str(self.run_dir.path),
            "base_model": {"backend": self.config.base_model.backend, **self.loaded.info},
            "scheduler": self.config.scheduler.type,
        }
        if self.world.distributed:
            facts["distributed"] = {
                "world_size": self.world.size,
                "strategy": self.strategy.name,
                "backend": self.world.backend,
                "placement": self.strategy.placement(),
                "peak_memory_bytes": self.rank_peaks,
                "collective_s": [round(s, 3) for s in self.rank_collective_s],
                "shard_base": self.strategy.collective_forward,
            }
        summary = run_summary(facts, totals, entries)
        if self.world.is_main:
            self.run_dir.write_summary(summary)
        self.events.train_end(summary)
        return summary


def check_sequences(jc: JobConfig, data: SplitDataset, expected: int) -> None:
    """Every sample of the job's data has as many sequences as its objective trains on."""
    for where, samples in (("training", data.train), ("held-out", data.eval)):
        wrong = next((s for s in samples if len(s.sequences()) != expected), None)
        if wrong is not None:
            raise MloraError(
                f"job {jc.name!r}: objective {jc.objective.type!r} trains on samples of {expected} sequence(s), "
                f"but a {where} sample of data.type {jc.data.type!r} has {len(wrong.sequences())}"
            )


def run(config: MloraConfig, host: PluginHost) -> dict[str, Any]:
    """Validate ``config``, train its jobs and return the summary (also in summary.json)."""
    return Engine(config, host).run()
