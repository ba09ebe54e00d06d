"""The training loop: plan -> batch -> one forward -> per-job loss -> one backward -> per-job step.

Adapters share no parameters and each job's loss reads only its own rows, so backpropagating
the sum of the job losses once gives every adapter exactly its own job's gradient.

The engine owns the loop; its parts live next to it: :class:`~.job.Job` (a job's data order,
optimizer and counters), :class:`~.run_directory.RunDirectory` (output dir, adapters,
checkpoints), :class:`~.held_out.HeldOutEvaluator` (held-out metrics), :class:`~.run_stats.RunStats`
(totals) and :class:`~mlora_core.events.RunEvents` (monitors and hooks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mlora_core.config.schema import JobConfig, MloraConfig
from mlora_core.config.validation import validate_config
from mlora_core.errors import Interrupted, MloraError
from mlora_core.events import RunEvents
from mlora_core.models.loading import load_base_model
from mlora_core.models.recompute import checkpoint_blocks
from mlora_core.plugin_api.conventions import pad_token_id
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import LoadedModel
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.plugin_api.scheduling import StepBudget, admit
from mlora_core.training.batch import MultiJobBatch, build_batch
from mlora_core.training.held_out import HeldOutEvaluator, Results
from mlora_core.training.job import COMPLETED, FAILED, INTERRUPTED, RUNNING, Job
from mlora_core.training.loss import learned_logits, per_job_loss_sums
from mlora_core.training.memory import MemoryModel, device_memory_limit, reset_step_peak, step_peak
from mlora_core.training.run_directory import RunDirectory, load_engine_state, load_job_state
from mlora_core.training.run_stats import RunStats
from mlora_core.training.summary import job_entry, run_summary
from mlora_core.training.utilisation import UtilisationMeter


class Engine:
    """Trains every job of a config together over one base model."""

    def __init__(self, config: MloraConfig, host: PluginHost, *, resume: bool = False, overwrite: bool = False) -> None:
        validate_config(config, host)  # before anything loads or is written
        self.config, self.host = config, host
        self.device = config.base_model.device
        self.resume, self.overwrite = resume, overwrite
        self.resumed = False
        self.stop_signal: str | None = None
        self.run_dir = RunDirectory(Path(config.output_dir))
        self.router = RowRouter()
        self.scheduler = host.schedulers.create(config.scheduler.type, config=config.scheduler)
        limit = config.scheduler.memory_limit
        self.memory = MemoryModel(limit=(device_memory_limit(self.device) if limit is None else limit) or None)
        self.budget = StepBudget(max_tokens=config.scheduler.max_tokens_per_step, fits=self.memory.fits)
        self.utilisation = UtilisationMeter(self.device)
        self.stats = RunStats()
        self.steps = 0
        #: job -> its summary.json entry, once it has ended
        self.results: dict[str, dict[str, Any]] = {}
        #: job -> {"eval_loss": ..., "accuracy": ...} before training (None: not measured)
        self.eval_before: Results = {}
        self.jobs: list[Job] = []

    # --- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the base model, attach every job's adapter, resume if asked, start the monitors."""
        self._started = time.perf_counter()
        checkpoint = self.run_dir.claim(resume=self.resume, overwrite=self.overwrite)
        self._load()
        self.run_dir.create()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.events = RunEvents(self.host, self.config, resume=self.resumed)

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
        self.pad_id = pad_token_id(self.loaded.tokenizer)
        self.evaluator = HeldOutEvaluator(self.loaded, self.router, self.pad_id, self.device)
        self.jobs = [self._make_job(i, jc) for i, jc in enumerate(self.config.jobs)]

    def _make_job(self, order: int, jc: JobConfig) -> Job:
        data = self.host.data_loaders.create(jc.data.type).load(jc.data, self.loaded.tokenizer, jc.train.seed)
        torch.manual_seed(jc.train.seed)  # adapter init depends on the job's seed only
        adapter = self.host.adapters.create(jc.adapter.type).attach(self.model, jc.name, jc.adapter, self.router)
        return Job(order, jc, adapter, data)

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """:meth:`setup`, then :meth:`train`."""
        self.setup()
        return self.train()

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
                if not isinstance(exc, Interrupted):
                    self._fail_running("interrupted" if isinstance(exc, KeyboardInterrupt) else f"run failed: {exc!r}")
                self._end(train_started)
                raise
            return self._end(train_started)
        finally:
            self.events.close()

    def _loop(self, train_started: float) -> None:
        while live := [j for j in self.jobs if j.status == RUNNING]:
            if self.stop_signal:
                raise Interrupted(self.stop_signal, self._interrupt(train_started))
            finished = self._step(live)
            every = self.config.checkpoint_every
            if every and (finished or self.steps % every == 0):
                self._checkpoint(train_started)

    def _step(self, live: list[Job]) -> bool:
        """One engine step, top to bottom; returns whether a job ended in it."""
        planned = self._plan(live)
        chosen = [job for job, _ in planned]
        started = time.perf_counter()
        self.utilisation.start()
        batch = build_batch([(job.name, job.take(rows)) for job, rows in planned], self.pad_id).to(self.device)
        reset_step_peak(self.device)
        try:
            losses = self._forward_backward(chosen, batch)
        except torch.OutOfMemoryError:
            self._recover_from_oom(chosen, batch)
            return False
        seconds = time.perf_counter() - started
        run_metrics = self._record_step(chosen, batch, seconds)
        job_metrics = self._step_optimizers(chosen, batch, losses, seconds)
        self.steps += 1
        self.events.step_end(self.steps, job_metrics, run_metrics)
        self._evaluate_during([job for job in chosen if job.eval_due()])
        ended = [job for job in chosen if job.status != RUNNING]
        for job in ended:
            self._finish(job)
        return bool(ended)

    # --- the parts of a step ----------------------------------------------------------------

    def _plan(self, live: list[Job]) -> list[tuple[Job, int]]:
        """Admit jobs by priority and ask the scheduler for this step's rows per job."""
        ready = [j for j in live if j.start_step <= self.steps]
        if not ready:  # every live job starts later: skip ahead to the first start
            self.steps = min(j.start_step for j in live)
            ready = [j for j in live if j.start_step <= self.steps]
        admitted = admit(ready, self.config.scheduler.max_concurrent_jobs)
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

    def _forward_backward(self, chosen: list[Job], batch: MultiJobBatch) -> dict[str, torch.Tensor]:
        """One forward over all rows, per-job losses, one backward of their sum."""
        with self.router.route(batch.segments):
            logits = learned_logits(self.loaded, batch)  # (learned positions, V)
        sums = per_job_loss_sums(batch, logits)  # job -> (loss sum, learned tokens)
        losses = {}
        for job in chosen:
            loss = job.scale_loss(sums[job.name][0])
            if torch.isfinite(loss):
                losses[job.name] = loss
            else:
                job.fail(f"loss became {loss.item()} at step {job.progress.step + 1}", revert=True)
        if losses:
            torch.stack(list(losses.values())).sum().backward()  # type: ignore[no-untyped-call]
        return losses

    def _record_step(self, chosen: list[Job], batch: MultiJobBatch, seconds: float) -> dict[str, float]:
        """The step's peak memory and tokens into the memory model and the totals; its run metrics."""
        rows, width = batch.input_ids.shape
        peak = step_peak(self.device)
        self.memory.observe(rows, width, peak)
        for job in chosen:
            job.progress.peak_memory_bytes = max(job.progress.peak_memory_bytes, peak)
        return {**self.stats.record_step(batch, peak, seconds), **self.utilisation.read(seconds)}

    def _step_optimizers(
        self, chosen: list[Job], batch: MultiJobBatch, losses: dict[str, torch.Tensor], seconds: float
    ) -> dict[str, dict[str, float]]:
        """Each job that took part records its rows; those whose optimizer batch is complete step."""
        metrics: dict[str, dict[str, float]] = {}
        for job, seg in zip(chosen, batch.segments, strict=True):
            if job.name not in losses:
                continue
            job.record_rows(losses[job.name].item(), int(batch.attention_mask[seg.start : seg.stop].sum()), seconds)
            if not job.batch_complete:
                continue
            try:
                metrics[job.name] = job.optimizer_step()
            except FloatingPointError as exc:
                job.fail(f"{exc} at step {job.progress.step + 1}")
        return metrics

    def _recover_from_oom(self, chosen: list[Job], batch: MultiJobBatch) -> None:
        """Out of memory mid-step: redo the jobs' current optimizer batches in smaller steps.

        Rewinding a job's whole optimizer batch drops any half-accumulated gradient, so the
        result equals a run that never ran out of memory.
        """
        rows, width = batch.input_ids.shape
        del batch
        self.memory.record_oom(rows, width)
        for job in chosen:
            job.rewind_batch()
            if rows == 1:
                job.fail(f"out of memory on a single row of {width} tokens")
                self._finish(job)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stats.oom_retries += 1

    # --- held-out evaluation ----------------------------------------------------------------

    def _evaluate_before(self) -> None:
        """Every job's held-out metrics before training; a job whose evaluation raises fails alone."""
        try:
            self.eval_before = self.evaluator.metrics(self.jobs)
        except Exception:  # find the job at fault: evaluate each alone
            self.eval_before = {}
            for job in self.jobs:
                try:
                    self.eval_before |= self.evaluator.metrics([job])
                except Exception as exc:
                    job.fail(f"held-out evaluation before training failed: {exc!r}")
                    self._finish(job, save=False)
        self.stats.eval_before_s = self.evaluator.seconds
        measured = [j for j in self.jobs if j.name in self.eval_before]
        self.events.evaluation(0, "before", {j.name: (0, self.eval_before[j.name]) for j in measured})

    def _evaluate_during(self, jobs: list[Job], final: bool = False) -> None:
        """``eval_every``: held-out loss of the current weights, fed to early stopping.

        ``final``: the job has ended; its last weights are compared with the best, not reported.
        """
        if not jobs:
            return
        losses = self.evaluator.losses(jobs)
        for job in jobs:
            loss = losses[job.name]
            if loss is not None:
                job.record_eval(loss)
        if not final:
            self.events.evaluation(
                self.steps, "during", {j.name: (j.progress.step, {"eval_loss": losses[j.name]}) for j in jobs}
            )

    # --- a job's end -------------------------------------------------------------------------

    def _finish(self, job: Job, save: bool = True) -> None:
        """Save and evaluate a job that has ended, then free it.

        A failed job keeps its last good adapter (the weights before the step that broke it),
        saved and evaluated like a completed one; its status and error say what happened.
        If saving or evaluating raises, the job fails with that error and the run goes on.
        """
        after: dict[str, float | None] = {}
        adapter_dir = None
        if save and job.status in (COMPLETED, FAILED):
            adapter_dir, after, error = self._save_and_evaluate(job)
            if error is not None:
                job.fail(f"{job.progress.error}; {error}" if job.progress.error else error)
        job.release()
        self.results[job.name] = job_entry(job, self.eval_before.get(job.name, {}), after, adapter_dir)
        self.events.job_end(job.name, self.results[job.name])

    def _save_and_evaluate(self, job: Job) -> tuple[str | None, dict[str, float | None], str | None]:
        """(adapter dir or None, held-out results, what went wrong or None) for a job that has ended."""
        adapter_dir = None
        doing = "choosing the best adapter"
        try:
            if job.config.train.early_stop is not None and job.history.last_eval_step != job.progress.step:
                self._evaluate_during([job], final=True)  # the last weights may be the best
            job.use_best()
            doing = "saving the adapter"
            adapter_dir = self.run_dir.save_adapter(job.name, job.adapter, self.loaded.name_or_path)
            doing = "held-out evaluation after training"
            after = self.evaluator.metrics([job])[job.name]
        except Exception as exc:  # this job's end failed; the others must not notice
            return adapter_dir, {}, f"{doing} failed: {exc!r}"
        self.events.evaluation(self.steps, "after", {job.name: (job.progress.step, after)})
        return adapter_dir, after, None

    def _fail_running(self, reason: str) -> None:
        for job in self.jobs:
            if job.status == RUNNING:
                job.fail(reason)
                self._finish(job, save=False)

    # --- checkpoints and the end ---------------------------------------------------------------

    def _checkpoint(self, train_started: float) -> Path:
        self.stats.train_elapsed = time.perf_counter() - train_started
        state = {
            **self.stats.state(),
            "eval_s": self.evaluator.seconds,
            "steps": self.steps,
            "eval_before": self.eval_before,
            "results": self.results,
            "memory": {"observations": self.memory.observations, "oom_tokens": self.memory.oom_tokens},
        }
        running = [j for j in self.jobs if j.status == RUNNING]
        return self.run_dir.save_checkpoint(self.steps, state, running)

    def _restore(self, directory: Path) -> None:
        state = load_engine_state(directory)
        self.stats = RunStats.from_state(state)
        self.evaluator.seconds = state["eval_s"]
        self.steps = state["steps"]
        self.eval_before, self.results = state["eval_before"], state["results"]
        for rows, length, peak in state["memory"]["observations"]:
            self.memory.observe(rows, length, peak)
        self.memory.oom_tokens = state["memory"]["oom_tokens"]
        for job in self.jobs:
            if job.name in self.results:  # finished before the checkpoint: not trained again
                job.progress.status = self.results[job.name]["status"]
                job.release()
            else:
                job.restore(*load_job_state(directory, job.name))
        self.resumed = True

    def _interrupt(self, train_started: float) -> str:
        """Checkpoint every unfinished job, mark them interrupted; returns the message for the user."""
        where = self._checkpoint(train_started)
        for job in self.jobs:
            if job.status == RUNNING:
                job.progress.status, job.progress.error = INTERRUPTED, f"stopped by {self.stop_signal}"
                self.results[job.name] = job_entry(job, self.eval_before.get(job.name, {}), {}, None)
        return f"stopped by {self.stop_signal} at step {self.steps}; checkpoint in {where}; continue with --resume"

    def _end(self, train_started: float) -> dict[str, Any]:
        """Write summary.json and tell the monitors and hooks the run has ended."""
        now = time.perf_counter()
        entries = [
            self.results.get(j.name) or job_entry(j, self.eval_before.get(j.name, {}), {}, None) for j in self.jobs
        ]
        train_tokens = sum(e["train_tokens"] for e in entries)
        loop_s = now - train_started
        totals = self.stats.totals(
            self.device, now - self._started, loop_s, self.evaluator.seconds, train_tokens, self.steps
        )
        facts = {
            "output_dir": str(self.run_dir.path),
            "base_model": {"backend": self.config.base_model.backend, **self.loaded.info},
            "scheduler": self.config.scheduler.type,
        }
        summary = run_summary(facts, totals, entries)
        self.run_dir.write_summary(summary)
        self.events.train_end(summary)
        return summary


def run(config: MloraConfig, host: PluginHost) -> dict[str, Any]:
    """Validate ``config``, train its jobs and return the summary (also in summary.json)."""
    return Engine(config, host).run()
