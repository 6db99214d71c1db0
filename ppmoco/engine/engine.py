"""The training loop, shared by every method: data, optimizer, lr, AMP, DP, checkpoints, logs."""
import functools
import logging
import math
import os
import time

import paddle
import paddle.distributed as dist

from ppmoco.config import dump_config, train_batch_size
from ppmoco.data import build_dataloader, build_dataset, require_labels, write_drawn_split
from ppmoco.data.preview import spread_indices, view_grid
from ppmoco.distributed import all_reduce_mean
from ppmoco.engine.checkpoint import (
    damage,
    find_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from ppmoco.engine.logger import VisualDLWriter
from ppmoco.engine.lr import build_schedule
from ppmoco.engine.preemption import ANOTHER_RANK, Preempted, StopSignals
from ppmoco.engine.profiler import StepProfiler
from ppmoco.engine.restart import record_failure, restarts_across_nodes, wait_for_launcher
from ppmoco.engine.rng import capture_random_state, restore_random_state
from ppmoco.engine.step import build_train_step
from ppmoco.engine.watchdog import Watchdog
from ppmoco.errors import CheckpointError, ConfigError, PpmocoError
from ppmoco.eval.evaluator import Evaluator, summary_lines
from ppmoco.host_allocator import loaded_allocator
from ppmoco.modules.base import Progress
from ppmoco.optimizers import initial_value
from ppmoco.progress import format_eta
from ppmoco.versions import describe_runtime

logger = logging.getLogger("ppmoco")
EMBEDDING_POINTS = 2000  # evaluation images per embedding in VisualDL (a log, not a dataset copy)


class Engine:
    """Trains a Module with the Engine/Optimizer/Data sections of a resolved config."""

    def __init__(self, cfg, module, env, evaluation=False, attempt=None):
        """`evaluation`: the Engine of an evaluation tool, which evaluates whatever Engine.eval_freq says;
        `attempt`: the restart.Attempt of a training run paddle.distributed.launch started."""
        self.cfg, self.module, self.env, self.attempt = cfg, module, env, attempt
        # The checkpoint this run went on from; the steps done (a step's checkpoint is part of it).
        self.resumed_from, self.steps_done = None, 0
        engine, train = cfg["Engine"], cfg["Data"]["Train"]
        self.save_load = engine["save_load"]
        self.epochs = engine["num_train_epochs"]
        sampler = train["sampler"]
        if sampler["name"] != "DistributedBatchSampler":
            raise ConfigError(f"Data.Train.sampler.name: '{sampler['name']}' is not supported; "
                              "use DistributedBatchSampler")
        self.batch_size = train_batch_size(cfg, env.world_size)  # per process
        self.global_batch = self.batch_size * env.world_size
        declared = cfg["Global"]["global_batch_size"]
        if declared is not None and declared != self.global_batch:
            raise ConfigError(f"Global.global_batch_size: {declared} but {env.world_size} process(es) x "
                              f"Data.Train.sampler.batch_size {sampler['batch_size']} make {self.global_batch}; "
                              "launch that many processes, change the batch size, or remove global_batch_size")
        module.setup(self.global_batch)

        seed = cfg["Global"]["seed"]
        self.train_set = build_dataset(train["dataset"], "Data.Train.dataset", seed)
        if module.needs_labels:
            require_labels(self.train_set, "Data.Train.dataset", type(module).__name__)
        self.train_loader, self.train_sampler = build_dataloader(
            self.train_set, self.batch_size, env.world_size, env.rank, sampler["shuffle"],
            sampler["drop_last"], seed, **train["loader"])
        if len(self.train_sampler) == 0:
            raise ConfigError(f"Data.Train.sampler.batch_size: the global batch {self.global_batch} "
                              f"exceeds the {len(self.train_set)} training images; lower it")

        self.eval_freq = engine["eval_freq"]
        has_eval = bool(cfg["Data"]["Eval"] and cfg["Data"]["Eval"]["dataset"])
        if self.eval_freq > 0 and not has_eval:
            raise ConfigError("Engine.eval_freq: validation requested but Data.Eval.dataset is not set; "
                              "add Data.Eval or set Engine.eval_freq=-1")
        # Built now where it will be used (training with a monitor, or an evaluation tool), so its
        # config errors come before anything runs; a run with the monitor off never reads Data.Eval.
        self.evaluator = Evaluator(cfg, module, env) if has_eval and (self.eval_freq > 0 or evaluation) else None
        self.best = None
        self.last_results = None  # the last evaluation's {protocol: {name: value}}

        opt = cfg["Optimizer"]
        self.schedule = build_schedule(opt["lr"])
        self.train_step = build_train_step(engine, opt, module, self.schedule(0, self.epochs), env)
        self.module, self.optimizer = self.train_step.module, self.train_step.optimizer
        self.guard = _FiniteGuard(self.module, self.optimizer, engine["skip_nonfinite_steps"],
                                  self.save_load["output_dir"], initial=functools.partial(initial_value, opt))
        self.writer = VisualDLWriter(os.path.join(self.save_load["output_dir"], "vdl"), env.is_main)
        self.watchdog = Watchdog(0, env.rank)  # watches only while fit() trains

    def _to_device(self, batch):
        if self.env.device == "cpu":
            return batch
        return [paddle.to_tensor(t, place=paddle.get_device()) for t in batch]

    def _trainer_state(self, epoch, next_batch, global_step):
        state = {"epoch": epoch, "next_batch": next_batch, "global_step": global_step,
                 "best": self.best, "rng_state": capture_random_state(self.env.device),
                 "loss_scaler": self.train_step.scaler_state(),
                 "skipped_steps": self.guard.skipped, "processes": self.env.world_size,
                 "batch_size": self.batch_size}
        if self.attempt is not None:  # the launcher job that wrote it: its restarts go on from it
            state["job"] = self.attempt.job
        return state

    def save(self, name, epoch, next_batch, global_step, regular=True):
        """Rank 0 writes; `regular` checkpoints move `latest` and rotate, `best` does neither."""
        self.steps_done = global_step - 1  # a failure before the checkpoint is written is in its step
        self.guard.check(global_step, state=True)
        if self.env.is_main:
            with self.watchdog.paused():
                path = save_checkpoint(self.save_load["output_dir"], name, self.module, self.optimizer,
                                       self._trainer_state(epoch, next_batch, global_step),
                                       self.save_load["keep_last"], regular=regular)
            logger.info(f"saved checkpoint {path}")
        self.steps_done = global_step

    def evaluate(self, global_step=0):
        """Run the configured protocol and return its {protocol: {name: value}}.

        Logs the protocol's own lines and writes every value to VisualDL as `eval/{protocol}_{name}`.
        """
        if self.evaluator is None:
            raise ConfigError("Data.Eval.dataset: not set; name the evaluation images in the config")
        results = self.last_results = self.evaluator()
        for line in summary_lines(results):
            logger.info(f"[eval] {line}")
        for protocol, values in results.items():
            for name, value in values.items():
                self.writer.add(f"eval/{protocol}_{name}", value, global_step)
        if self.evaluator.embedding is not None:
            features, labels = self.evaluator.embedding
            shown = spread_indices(len(labels), EMBEDDING_POINTS)
            self.writer.embedding(f"eval/features_step{global_step}", features[shown], labels[shown])
        return results

    def _validate_and_keep_best(self, epoch, global_step):
        self.guard.check(global_step)
        results = self.evaluate(global_step)
        monitor = self.module.monitor
        value = monitored_value(results, monitor)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            logger.info(f"new best {monitor} {value:.2f} at epoch {epoch}")
            self.save("best", epoch, 0, global_step, regular=False)

    def _show_views(self, epoch):
        """The first epoch's augmented views of 8 training images, as a picture in VisualDL."""
        self.train_set.set_epoch(epoch)
        indices = spread_indices(len(self.train_set), 8)
        self.writer.image("train/views", view_grid(self.train_set, indices, size=64), 0)

    def _resume(self):
        restart = self.attempt is not None and self.attempt.number > 0
        job = self.attempt.job if restart else None
        path = agreed_resume_checkpoint(self.save_load, self.env.world_size, job)
        if restart:
            logger.info(f"restart {self.attempt.number} of this launcher job: going on from {path or 'the start'}")
        if path is None:
            return 0, 0, 0
        self.resumed_from = os.path.basename(path)
        saved = load_trainer_state(path)
        self.steps_done = saved.get("global_step", 0)  # a failure from here on is in the step after it
        check_geometry(saved, path, self.env.world_size, self.batch_size)
        state = load_checkpoint(path, self.module, self.optimizer)
        lost = restore_random_state(state["rng_state"], self.env.device)
        if lost:
            logger.warning(f"{path}: {lost} could not be restored, so random draws differ from an uninterrupted run")
        self.train_step.load_scaler_state(state.get("loss_scaler"), path)
        self.best = state.get("best")
        self.guard.skipped = state.get("skipped_steps", 0)
        logger.info(f"resumed from {path}: epoch {state['epoch'] + 1}, batch {state['next_batch']}, "
                    f"global step {state['global_step']}")
        return state["epoch"], state["next_batch"], state["global_step"]

    def record_failure(self, error, line):
        """The tool's fatal-error hook (ppmoco.cli.on_fatal) and the watchdog's: a rank of a launcher job that
        fails or hangs leaves the one-line cause `line` and the step it was in for the job's next attempt
        (ppmoco/engine/restart.py); a stop on a signal (Preempted) is no failure."""
        if self.attempt is not None and not isinstance(error, Preempted):
            record_failure(self.save_load["output_dir"], self.attempt, self.env.rank, self.steps_done + 1,
                           self.resumed_from, line)

    def fit(self):
        epoch, start_batch, global_step = self._resume()
        if self.env.is_main:
            dump_config(self.cfg, os.path.join(self.save_load["output_dir"], "config.yaml"))
            write_drawn_split(self.train_set, self.save_load["output_dir"])
        steps_per_epoch = len(self.train_sampler)
        max_steps = self.cfg["Engine"]["max_steps"]
        total_steps = steps_per_epoch * self.epochs
        if max_steps > 0:
            total_steps = min(total_steps, max_steps)
        logger.info(f"training {type(self.module).__name__}: {len(self.train_set)} images, "
                    f"{self.env.world_size} process(es) x batch {self.batch_size}"
                    f" on {self.env.device} ({self.env.num_threads} thread(s) each, "
                    f"{self.train_step.conv} convolutions"
                    f"{' in bfloat16' if self.train_step.conv_dtype == 'bfloat16' else ''}), "
                    f"{steps_per_epoch} steps/epoch, {total_steps} steps in all")
        logger.info(describe_runtime())
        logger.info(f"host memory allocator (malloc): {loaded_allocator()}")
        if self.env.is_main and global_step == 0:
            self._show_views(epoch)
        step_profiler = StepProfiler(self.cfg["Profiler"], self.env.device) if self.cfg["Profiler"]["enable"] else None
        meter = _Meter()
        self.watchdog = Watchdog(self.cfg["Engine"]["hang_timeout"], self.env.rank,
                                 on_hang=functools.partial(self.record_failure, None))
        try:
            with StopSignals() as signals, self.watchdog:
                return self._loop(epoch, start_batch, global_step, steps_per_epoch, total_steps, meter,
                                  step_profiler, signals)
        except Exception as error:
            cause = failed_elsewhere(error) if self.env.world_size > 1 else None
            if cause is not None and restarts_across_nodes():
                wait_for_launcher(cause)
            raise
        finally:  # also when stopped by a signal (Preempted)
            if step_profiler is not None:
                step_profiler.close()
            self.writer.close()

    def _loop(self, epoch, start_batch, global_step, steps_per_epoch, total_steps, meter, step_profiler, signals):
        while epoch < self.epochs and global_step < total_steps:
            self.module.train()
            self.train_set.set_epoch(epoch)
            self.train_sampler.set_epoch(epoch, start_batch)
            meter.resume()  # the steps since the last log line still count; the pause does not
            for batch_idx, batch in enumerate(self.train_loader, start=start_batch):
                progress = Progress(epoch + batch_idx / steps_per_epoch, global_step, steps_per_epoch * self.epochs)
                lr = self.schedule(progress.epoch, self.epochs)
                self.optimizer.set_lr(lr)
                meter.data_ready()
                out = self.guard.step(functools.partial(self.train_step, progress=progress), self._to_device(batch),
                                      global_step + 1)
                self.watchdog.beat()
                global_step += 1
                self.steps_done = global_step
                meter.step_done(out)
                if step_profiler is not None:
                    step_profiler.step()
                if global_step % self.cfg["Engine"]["logging_freq"] == 0 or global_step == total_steps:
                    self.guard.check(global_step)
                    self._log(meter, epoch, batch_idx, steps_per_epoch, global_step, total_steps, lr)
                # max_steps ending mid-epoch saves where it stopped; a full epoch saves below.
                stop = global_step == total_steps and batch_idx + 1 < steps_per_epoch
                save_steps = self.save_load["save_steps"]
                if stop or (save_steps > 0 and global_step % save_steps == 0):
                    self.save(f"step_{global_step}", epoch, batch_idx + 1, global_step)
                if stop:
                    break
                if signals.requested():
                    self._preempt(signals.received, epoch, batch_idx + 1, global_step)
            else:
                start_batch = 0
                epoch += 1
                self.module.on_epoch_end(epoch)
                if self.eval_freq > 0 and (epoch % self.eval_freq == 0 or epoch == self.epochs):
                    with self.watchdog.paused():
                        self._validate_and_keep_best(epoch, global_step)
                save_epoch = self.save_load["save_epoch"]
                last = epoch == self.epochs or global_step == total_steps
                if save_epoch > 0 and (epoch % save_epoch == 0 or last):
                    self.save(f"epoch_{epoch}", epoch, 0, global_step)
        return global_step

    def _preempt(self, signal_name, epoch, next_batch, global_step):
        """Save where training stands and stop with Preempted (ppmoco/engine/preemption.py)."""
        name = f"step_{global_step}"
        self.save(name, epoch, next_batch, global_step)
        raise Preempted(f"stopped by {signal_name} after step {global_step}: saved "
                        f"{os.path.join(self.save_load['output_dir'], name)}; run the same command with "
                        "-o Engine.save_load.auto_resume=true to continue", signal_name)

    def _log(self, meter, epoch, batch_idx, steps_per_epoch, global_step, total_steps, lr):
        values, batch_cost, reader_cost = meter.summary()
        ips = self.global_batch / batch_cost if batch_cost > 0 else float("nan")
        metrics = ", ".join(f"{k}: {v:.4f}" for k, v in values.items()) or "every step skipped"
        if not all(math.isfinite(v) for v in values.values()):
            logger.warning(f"non-finite metrics at step {global_step}: {metrics}")
        skipped = f", skipped: {self.guard.skipped}" if self.guard.skip else ""
        logger.info(f"[train] epoch: {epoch + 1}/{self.epochs}, step: [{batch_idx + 1}/{steps_per_epoch}], "
                    f"lr: {lr:.6f}, {metrics}, batch_cost: {batch_cost:.4f} s, "
                    f"reader_cost: {reader_cost:.4f} s, ips: {ips:.1f} images/s, "
                    f"eta: {format_eta(batch_cost * (total_steps - global_step))}{skipped}")
        if self.guard.skip:
            self.writer.add("train/skipped_steps", self.guard.skipped, global_step)
        for k, v in values.items():
            self.writer.add(f"train/{k}", v, global_step)
        self.writer.add("train/lr", lr, global_step)
        self.writer.add("train/ips", ips, global_step)


def failed_elsewhere(error):
    """Why training stopped with `error` where another process stopped or failed first (a stop signal
    received elsewhere, a collective of gloo or NCCL that lost its peer); None where the cause is this
    process's own."""
    if isinstance(error, Preempted):
        return error.signal_name if error.signal_name == ANOTHER_RANK else None
    text = str(error).strip()
    if not isinstance(error, PpmocoError) and ("gloo" in text or "NCCL" in text):
        return f"{type(error).__name__}: {text.splitlines()[0]}"
    return None


def agreed_resume_checkpoint(save_load, processes, job=None):
    """find_resume_checkpoint's answer (for a restart of launcher job `job`) as rank 0 finds it, the same
    on every rank.

    Only rank 0 writes checkpoints, so a rank on a node that does not share Engine.save_load.output_dir
    would find none (and start afresh) or an older one (and diverge). Rank 0 decides and sends its
    answer, or its error, to every rank; each rank checks it can read that checkpoint intact, and all
    fail alike when one cannot, so none waits in a collective for a rank that stopped.
    """
    if processes == 1:
        return find_resume_checkpoint(save_load, job)
    decision = [None, None]  # [path, error message]
    if dist.get_rank() == 0:
        try:
            decision[0] = find_resume_checkpoint(save_load, job)
        except CheckpointError as err:
            decision[1] = str(err)
    dist.broadcast_object_list(decision, src=0)
    path, error = decision
    if error is not None:
        raise CheckpointError(error)
    readable = path is None or (os.path.isdir(path) and damage(path) is None)
    everyone = []
    dist.all_gather_object(everyone, readable)
    blind = [rank for rank, ok in enumerate(everyone) if not ok]
    if blind:
        raise CheckpointError(
            f"rank(s) {', '.join(map(str, blind))} cannot read {path} intact, the checkpoint rank 0 resumes from: "
            "only rank 0 writes checkpoints, so Engine.save_load.output_dir must be a folder every node reads "
            "(shared storage), or copy that checkpoint to the same path on every node")
    return path


def check_geometry(state, path, processes, batch_size):
    """Resume another number of processes only at the same global batch (module docstring of
    ppmoco/data/sampler.py: global batch k is then the same images), saying what changes; else a
    one-line CheckpointError naming both geometries and the keys to change."""
    saved = (state.get("processes"), state.get("batch_size"))
    if None in saved or saved == (processes, batch_size):  # the same run, or a checkpoint from before it was recorded
        return
    was, now = saved[0] * saved[1], processes * batch_size
    if was != now:
        fix = (f"set Data.Train.sampler.batch_size={was // processes}" if was % processes == 0
               else f"launch a number of processes that divides {was}")
        raise CheckpointError(
            f"{path} was written by {saved[0]} process(es) x batch {saved[1]} (global batch {was}); this run is "
            f"{processes} x {batch_size} ({now}): resuming at the same image needs the same global batch: {fix}, "
            f"or run {saved[0]} x {saved[1]} as before (Data.Train.sampler.batch_size=null with "
            f"Global.global_batch_size={was} keeps that global batch for any number of processes that divides it)")
    logger.warning(f"resuming {path} of {saved[0]} process(es) x batch {saved[1]} with {processes} x {batch_size}: "
                   f"the same global batch {now}, so training continues at the same image; BatchNorm statistics "
                   f"now come from {batch_size} images per process (were {saved[1]}), so the run is no longer "
                   "bit-identical to an uninterrupted one")


def monitored_value(results, monitor):
    """The value named `monitor` in whichever protocol's flat results hold it, else None.

    None as well when the module monitors nothing: its best checkpoint is then never written.
    """
    if not monitor:
        return None
    return next((values[monitor] for values in results.values() if monitor in values), None)


class NonFiniteError(PpmocoError):
    """Training diverged: the loss, or the weights and buffers, became NaN or Inf."""


MASTER_WEIGHTS = "master_weights/"  # _tensors' prefix of O2's float32 parameter copies


def _tensors(state, prefix=""):
    """(key, tensor) pairs of a possibly nested state dict (AMP nests its master weights)."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}/")
        elif isinstance(value, paddle.Tensor):
            yield f"{prefix}{key}", value


def _on_any_rank(flags):
    """Host copy of float 0/1 `flags` that is non-zero wherever any rank's flag is set."""
    flags = flags.astype("float32")
    all_reduce_mean([flags])
    return flags.numpy() > 0


class _FiniteGuard:
    """Keeps NaN/Inf out of checkpoints and evaluations (see Engine.skip_nonfinite_steps).

    Stopping (the default) costs no host sync per step: each step's "loss not finite" flag stays
    on the device until check() runs, which the loop calls where it syncs anyway (log lines) and
    before every save or evaluation. So a divergence is reported with its first step, at most
    logging_freq - 1 steps after it, and nothing computed from it is ever written. Before a save
    the whole module state is checked too: an update can overflow the weights with a finite loss.

    Skipping has to decide before the next step, so it syncs every step, and it undoes the step
    generically (no method-specific code): the module state (weights, queue, BN statistics) and
    the optimizer state are copied on the device before the step and put back if the loss or
    the updated parameters are not finite. Flags are combined over ranks, so all ranks agree.
    """

    def __init__(self, module, optimizer, skip, output_dir, initial=lambda key: 0.0):
        """`initial(key)`: the value optimizer state `key` starts from (ppmoco.optimizers.initial_value)."""
        self.module, self.optimizer, self.skip = module, optimizer, skip
        self.initial = initial
        self.params = module.trainable_parameters()
        self.output_dir = output_dir
        self.pending_from, self.pending = 0, []  # first step and flags not yet checked
        self.skipped = 0

    def step(self, train_step, batch, step):
        """Run train_step(batch) as step number `step`; return its metrics (None if skipped)."""
        if not self.skip:
            out = train_step(batch)
            if not self.pending:
                self.pending_from = step
            self.pending.append(paddle.logical_not(paddle.isfinite(out["loss"])))
            return out
        module_state = {k: v.clone() for k, v in self.module.state_dict().items()}
        optimizer_state = {k: v.clone() for k, v in _tensors(self.optimizer.state_dict())}
        out = train_step(batch)
        finite = [paddle.isfinite(out["loss"]).all()] + [paddle.isfinite(p).all() for p in self.params]
        if not _on_any_rank(paddle.logical_not(paddle.stack(finite).all()))[()]:
            return out
        self.module.set_state_dict(module_state)
        by_name = {p.name: p for p in self.params}
        for key, tensor in _tensors(self.optimizer.state_dict()):
            if key in optimizer_state:
                tensor.set_value(optimizer_state[key])
            elif key.startswith(MASTER_WEIGHTS):
                # O2's float32 copy of a parameter, made by the bad step itself (Paddle makes it before
                # it checks for overflow): the restored parameter, as a fresh run would make it.
                tensor.set_value(by_name[key[len(MASTER_WEIGHTS):]].astype(tensor.dtype))
            else:  # state the bad step created (on the first step) starts where the optimizer starts it
                tensor.set_value(paddle.full_like(tensor, self.initial(key)))
        self.skipped += 1
        logger.warning(f"step {step}: loss or update not finite; skipped it and restored the weights, "
                       f"buffers and optimizer state ({self.skipped} step(s) skipped so far)")
        return None

    def check(self, step, state=False):
        """Raise NonFiniteError for a pending non-finite loss or, with `state`, a non-finite module state."""
        pending, self.pending = self.pending, []
        if pending:
            bad = _on_any_rank(paddle.stack(pending)).nonzero()[0]
            if bad.size:
                self._stop(f"the loss is NaN or Inf at step {self.pending_from + int(bad[0])}")
        if state:
            finite = [paddle.isfinite(t).all() for t in self.module.state_dict().values()
                      if paddle.is_floating_point(t)]
            if _on_any_rank(paddle.logical_not(paddle.stack(finite).all()))[()]:
                self._stop(f"the weights or buffers hold NaN or Inf after step {step} (the update overflowed)")

    def _stop(self, what):
        where = latest_checkpoint(self.output_dir)
        kept = f"the last checkpoint, {where}, is intact" if where else "no checkpoint was written"
        raise NonFiniteError(f"training diverged: {what}; stopped without saving ({kept}); lower "
                             "Optimizer.lr.learning_rate, check the data, or set "
                             "Engine.skip_nonfinite_steps=true to skip such steps")


class _Meter:
    """Sums metric tensors on device between log lines; syncs with the host only when read."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.sums, self.count, self.kept = {}, 0, 0
        self.batch_time = self.reader_time = 0.0
        self.resume()

    def resume(self):
        """Start timing the next step from now: time between epochs (evaluation, checkpoints) is
        neither a step's nor the reader's."""
        self.last = time.perf_counter()

    def data_ready(self):
        self.reader_time += time.perf_counter() - self.last

    def step_done(self, out):
        """Account a step; `out` None (a skipped step) counts its time but not its metrics."""
        for k, v in (out or {}).items():
            v = v.detach()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.kept += out is not None
        now = time.perf_counter()
        self.batch_time += now - self.last
        self.last = now

    def summary(self):
        n = max(self.count, 1)
        values = {k: float(v) / max(self.kept, 1) for k, v in self.sums.items()}
        result = values, self.batch_time / n, self.reader_time / n
        self.restart()
        return result
