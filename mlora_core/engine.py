"""The training loop: schedule -> batch -> one forward -> per-job loss -> backward -> per-job step.

Adapters share no parameters and each job's loss reads only its own rows, so backpropagating
the sum of the job losses once gives every adapter exactly its own job's gradient.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mlora_core.base_model import load_base_model
from mlora_core.batch import MultiJobBatch, build_batch
from mlora_core.config import JobConfig, MloraConfig, to_dict
from mlora_core.validation import validate_config
from mlora_core.errors import Interrupted, MloraError
from mlora_core.evaluate import held_out_losses, held_out_metrics
from mlora_core.checkpointing import checkpoint_blocks
from mlora_core.checkpoint import CHECKPOINTS, latest_checkpoint, load_engine_state, load_job_state, save_checkpoint
from mlora_core.job import COMPLETED, FAILED, INTERRUPTED, RUNNING, Job
from mlora_core.loss import learned_logits, per_job_loss_sums
from mlora_core.memory import MemoryModel, device_memory_limit, peak_memory, reset_step_peak, step_peak
from mlora_core.plugins import PluginHost
from mlora_core.protocols import LoadedModel
from mlora_core.routing import RowRouter
from mlora_core.scheduling import StepBudget, admit
from mlora_core.summary import SUMMARY_FORMAT, job_entry, write_json_atomic
from mlora_core.utilisation import UtilisationMeter


class Engine:
    """Trains every job of a config together over one base model."""

    def __init__(self, config: MloraConfig, host: PluginHost, *, resume: bool = False, overwrite: bool = False) -> None:
        validate_config(config, host)  # before anything loads or is written
        self.config = config
        self.resume, self.overwrite = resume, overwrite
        self.resumed = False
        self.stop_signal: str | None = None
        self.train_elapsed = 0.0
        self.host = host
        self.out = Path(config.output_dir)
        self.router = RowRouter()
        self.run_info: dict[str, Any] = {
            "config": to_dict(config),
            "output_dir": str(self.out),
            "jobs": [j.name for j in config.jobs],
        }
        self.scheduler = host.schedulers.create(config.scheduler.type, config=config.scheduler)
        limit = config.scheduler.memory_limit
        if limit is None:
            limit = device_memory_limit(config.base_model.device)
        self.memory = MemoryModel(limit=limit or None)
        self.utilisation = UtilisationMeter(config.base_model.device)
        self.budget = StepBudget(max_tokens=config.scheduler.max_tokens_per_step, fits=self.memory.fits)
        self.padded_tokens = self.real_tokens = self.oom_retries = self.peak_bytes = 0
        self.eval_s = self.eval_before_s = 0.0
        self.monitors: list[Any] = []
        self.results: dict[str, dict[str, Any]] = {}
        #: job -> {"eval_loss": ..., "accuracy": ...} before training (None: not measured)
        self.eval_before: dict[str, dict[str, float | None]] = {}
        self.steps = 0

    # --- set-up ---------------------------------------------------------------------------

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
        tokenizer = self.loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.jobs = [self._make_job(i, jc) for i, jc in enumerate(self.config.jobs)]

    def _make_job(self, order: int, jc: JobConfig) -> Job:
        loader = self.host.datasets.create(jc.data.type)
        data = loader.load(jc.data, self.loaded.tokenizer, jc.train.seed)
        torch.manual_seed(jc.train.seed)  # adapter init depends on the job's seed only
        adapter = self.host.adapters.create(jc.adapter.type).attach(self.model, jc.name, jc.adapter, self.router)
        return Job(order, jc, adapter, data)

    def _start_monitors(self) -> None:
        for name, options in self.config.monitor.items():
            if options is not None:
                self.monitors.append(self.host.monitors.create(name, output_dir=str(self.out), **options))

    def _emit(self, event: str, *args: Any) -> None:
        """Tell the monitors, then the lifecycle hooks (which also get the run info first)."""
        for monitor in self.monitors:
            getattr(monitor, event)(*args)
        hook_args = args if event == "on_train_start" else (self.run_info, *args)
        getattr(self.host, event)(*hook_args)

    # --- the run --------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the base model, attach every job's adapter, resume if asked, start monitors."""
        self._started = time.perf_counter()
        checkpoint = self._claim_output_dir()
        self._load()
        self.out.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._start_monitors()

    def request_stop(self, signal_name: str) -> None:
        """Stop at the next step boundary, after checkpointing every unfinished job."""
        self.stop_signal = signal_name

    def train(self) -> dict[str, Any]:
        """Train every job to completion (or failure), write summary.json and return it."""
        self._emit("on_train_start", self.run_info)
        if not self.resumed:
            self.eval_before = self._evaluate(self.jobs)
            self.eval_before_s = self.eval_s
            self._emit_eval({j.name: (0, self.eval_before[j.name]) for j in self.jobs})
        train_started = time.perf_counter() - self.train_elapsed
        for job in self.jobs:
            job.started = train_started
        try:
            while live := [j for j in self.jobs if j.status == RUNNING]:
                if self.stop_signal:
                    raise Interrupted(self.stop_signal, self._interrupt(train_started))
                finished = self._step(live)
                every = self.config.checkpoint_every
                if every and (finished or self.steps % every == 0):
                    self._checkpoint(train_started)
        except BaseException as exc:  # record every job's state, then let it propagate
            if not isinstance(exc, Interrupted):
                for job in self.jobs:
                    if job.status == RUNNING:
                        job.fail("interrupted" if isinstance(exc, KeyboardInterrupt) else f"run failed: {exc!r}")
                        self._finish(job, save=False)
            self._end(train_started)
            raise
        return self._end(train_started)

    # --- checkpoints ------------------------------------------------------------------------

    def _claim_output_dir(self) -> Path | None:
        """Refuse to mix two runs in one output dir; returns the checkpoint to resume, if any."""
        summary, checkpoints = self.out / "summary.json", self.out / CHECKPOINTS
        if self.resume:
            return latest_checkpoint(self.out)
        if summary.exists() or checkpoints.exists():
            if not self.overwrite:
                raise MloraError(
                    f"output_dir {self.out} already holds a run; pass --resume to continue it, "
                    "--overwrite to start again, or choose another output_dir"
                )
            summary.unlink(missing_ok=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # the jsonl monitor appends
            shutil.rmtree(checkpoints, ignore_errors=True)
        return None

    def _checkpoint(self, train_started: float) -> Path:
        state = {
            "steps": self.steps,
            "train_elapsed": time.perf_counter() - train_started,
            "padded_tokens": self.padded_tokens,
            "real_tokens": self.real_tokens,
            "oom_retries": self.oom_retries,
            "eval_s": self.eval_s,
            "eval_before_s": self.eval_before_s,
            "eval_before": self.eval_before,
            "results": self.results,
            "memory": {"observations": self.memory.observations, "oom_tokens": self.memory.oom_tokens},
        }
        running = [j for j in self.jobs if j.status == RUNNING]
        return save_checkpoint(self.out, self.steps, state, running)

    def _restore(self, directory: Path) -> None:
        state = load_engine_state(directory)
        for key in ("steps", "train_elapsed", "padded_tokens", "real_tokens", "oom_retries", "eval_s", "eval_before_s"):
            setattr(self, key, state[key])
        self.eval_before, self.results = state["eval_before"], state["results"]
        for rows, length, peak in state["memory"]["observations"]:
            self.memory.observe(rows, length, peak)
        self.memory.oom_tokens = state["memory"]["oom_tokens"]
        for job in self.jobs:
            if job.name in self.results:  # finished before the checkpoint: not trained again
                job.status = self.results[job.name]["status"]
                job.release()
            else:
                job.restore(*load_job_state(directory, job.name))
        self.resumed = True

    def _interrupt(self, train_started: float) -> str:
        """Checkpoint every unfinished job, mark them interrupted; returns the message for the user."""
        where = self._checkpoint(train_started)
        for job in self.jobs:
            if job.status == RUNNING:
                job.status, job.error = INTERRUPTED, f"stopped by {self.stop_signal}"
                self.results[job.name] = job_entry(job, self.eval_before.get(job.name, {}), {}, None)
        return f"stopped by {self.stop_signal} at step {self.steps}; checkpoint in {where}; continue with --resume"

    def _end(self, train_started: float) -> dict[str, Any]:
        """Write summary.json and tell the monitors and hooks the run has ended."""
        now = time.perf_counter()
        summary = self._summary(now - self._started, now - train_started)
        write_json_atomic(self.out / "summary.json", summary)
        self._emit("on_train_end", summary)
        return summary

    def run(self) -> dict[str, Any]:
        """:meth:`setup`, then :meth:`train`."""
        self.setup()
        return self.train()

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
            job.waited = 0 if job.name in plan else job.waited + 1
        by_name = {j.name: j for j in admitted}
        return [(by_name[name], rows) for name, rows in plan.items()]

    def _step(self, live: list[Job]) -> bool:
        """One engine step: one forward and one backward over the planned rows of several jobs.

        Returns whether a job ended in this step.
        """
        planned = self._plan(live)
        chosen = [job for job, _ in planned]
        t0 = time.perf_counter()
        self.utilisation.start()
        batch = build_batch([(job.name, job.take(rows)) for job, rows in planned], self.pad_id)
        batch = batch.to(self.config.base_model.device)
        reset_step_peak(self.config.base_model.device)
        try:
            losses = self._forward_backward(chosen, batch)
        except torch.OutOfMemoryError:
            self._recover_from_oom(chosen, batch)
            return False
        rows, width = batch.input_ids.shape
        peak, real = step_peak(self.config.base_model.device), int(batch.attention_mask.sum())
        self.memory.observe(rows, width, peak)
        self.peak_bytes = max(self.peak_bytes, peak)  # per-step resets hide earlier peaks from peak_memory()
        for job in chosen:
            job.peak_memory_bytes = max(job.peak_memory_bytes, peak)
        self.padded_tokens += rows * width
        self.real_tokens += real
        seconds = time.perf_counter() - t0
        self.steps += 1
        run_metrics = {
            "step_time_s": seconds,
            "rows": rows,
            "tokens": rows * width,
            "real_tokens": real,
            "padding_fraction": 1 - real / (rows * width),
            "peak_memory_bytes": peak,
            **self.utilisation.read(seconds),
        }
        self._emit("on_step_end", self.steps, self._after_backward(chosen, batch, losses, seconds), run_metrics)
        self._periodic_eval([job for job in chosen if job.eval_due()])
        ended = [job for job in chosen if job.status != RUNNING]
        for job in ended:
            self._finish(job)
        return bool(ended)

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
                job.fail(f"loss became {loss.item()} at step {job.step + 1}", revert=True)
        if losses:
            torch.stack(list(losses.values())).sum().backward()  # type: ignore[no-untyped-call]
        return losses

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
        self.oom_retries += 1

    def _after_backward(
        self, chosen: list[Job], batch: Any, losses: dict[str, torch.Tensor], seconds: float
    ) -> dict[str, dict[str, float]]:
        metrics: dict[str, dict[str, float]] = {}
        for job, seg in zip(chosen, batch.segments, strict=True):
            if job.name not in losses:
                continue
            tokens = int(batch.attention_mask[seg.start : seg.stop].sum())
            try:
                result = job.after_backward(losses[job.name].item(), tokens, seconds)
            except FloatingPointError as exc:
                job.fail(f"{exc} at step {job.step + 1}")
                continue
            if result is not None:
                metrics[job.name] = result
        return metrics

    def _finish(self, job: Job, save: bool = True) -> None:
        """Evaluate and save a completed job, then free it.

        A failed job keeps its last good adapter (the weights before the step that broke it),
        saved and evaluated like a completed one; its status and error say what happened.
        """
        after: dict[str, float | None] = {}
        adapter_dir = None
        if save and job.status in (COMPLETED, FAILED):
            if job.config.train.early_stop is not None and job.last_eval_step != job.step:
                self._periodic_eval([job], final=True)  # the last weights may be the best
            job.use_best()
            after = self._evaluate([job])[job.name]
            adapter_dir = str(self.out / job.name)
            job.adapter.save(adapter_dir, self.loaded.name_or_path)
            self._emit_eval({job.name: (job.step, after)})
        job.release()
        self.results[job.name] = job_entry(job, self.eval_before.get(job.name, {}), after, adapter_dir)
        self._emit("on_job_end", job.name, self.results[job.name])

    def _held_out_losses(self, jobs: list[Job]) -> dict[str, float | None]:
        started = time.perf_counter()
        sets = [(j.name, j.data.eval, j.config.train.micro_batch_size) for j in jobs if j.data.eval]
        losses = held_out_losses(self.loaded, self.router, sets, self.pad_id, self.config.base_model.device)
        self.eval_s += time.perf_counter() - started
        return {j.name: losses.get(j.name) for j in jobs}

    def _evaluate(self, jobs: list[Job]) -> dict[str, dict[str, float | None]]:
        """Per job: held-out ``eval_loss`` and, for ``exact_match`` data, ``accuracy``."""
        started = time.perf_counter()
        sets = [(j.name, j.data.eval, j.config.train.micro_batch_size, j.config.data.exact_match) for j in jobs]
        metrics = held_out_metrics(self.loaded, self.router, sets, self.pad_id, self.config.base_model.device)
        self.eval_s += time.perf_counter() - started
        return metrics

    def _periodic_eval(self, jobs: list[Job], final: bool = False) -> None:
        """``eval_every``: held-out loss of the current weights, fed to early stopping.

        ``final``: the job has ended; its last weights are compared with the best, not reported.
        """
        if not jobs:
            return
        losses = self._held_out_losses(jobs)
        for job in jobs:
            loss = losses[job.name]
            if loss is not None:
                job.record_eval(loss)
        if not final:
            self._emit_eval({j.name: (j.step, {"eval_loss": losses[j.name]}) for j in jobs})

    def _emit_eval(self, results: dict[str, tuple[int, dict[str, float | None]]]) -> None:
        """Report held-out results: job -> (the job's optimizer step, {metric: value or None})."""
        metrics = {}
        for name, (step, values) in results.items():
            found = {("eval_accuracy" if k == "accuracy" else k): v for k, v in values.items() if v is not None}
            if found:
                metrics[name] = {**found, "step": step}
        if metrics:
            self._emit("on_step_end", self.steps, metrics, {})

    def _summary(self, wall_s: float, loop_s: float) -> dict[str, Any]:
        """The run's summary; ``loop_s`` is the training loop's wall time (its evaluations included)."""
        results = [self.results[j.name] for j in self.jobs]
        tokens = sum(r["train_tokens"] for r in results)
        train_s = loop_s - (self.eval_s - self.eval_before_s)  # held-out evaluation is not training
        latencies = [r["latency_s"] for r in results]
        peak_bytes, peak_kind = peak_memory(self.config.base_model.device)
        return {
            "format": SUMMARY_FORMAT,
            "output_dir": str(self.out),
            "base_model": {"backend": self.config.base_model.backend, **self.loaded.info},
            "scheduler": self.config.scheduler.type,
            "wall_s": round(wall_s, 3),
            "train_s": round(train_s, 3),
            "eval_s": round(self.eval_s, 3),
            "makespan_s": round(max(latencies), 3),
            "mean_job_latency_s": round(sum(latencies) / len(latencies), 3),
            "engine_steps": self.steps,
            "train_tokens": tokens,
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "oom_retries": self.oom_retries,
            "peak_memory_bytes": max(peak_bytes, self.peak_bytes),
            "peak_memory_kind": peak_kind,
            "jobs": results,
        }


def run(config: MloraConfig, host: PluginHost) -> dict[str, Any]:
    """Validate ``config``, train its jobs and return the summary (also in summary.json)."""
    return Engine(config, host).run()
