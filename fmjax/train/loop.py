"""The training loop: data in, steps, records, evaluations and checkpoints out.

A run holds its workdir's lock and resumes from the latest usable checkpoint
there (see fmjax.train.checkpoint). Before it compiles anything it prints what
it trains (model, parameter counts, mesh, data, workdir) and whether it resumed
or loaded init_from; then "compiling the train step..." and the compile time.
No record (config.json, metrics.jsonl, TensorBoard) is written before the
restore has succeeded and the train step has compiled. Metrics of step t are
fetched only after step t+1 has been dispatched, so the device never waits on
logging; fmjax.train.guard reads them for non-finite steps and loss spikes.

Checkpoints are saved asynchronously, every checkpoint.every steps. A save
still in flight when the loop is about to record step s + every is waited for
first, so by the time step t is recorded the checkpoint of every multiple of
`every` up to t - every is complete: a run killed at any moment resumes from
a checkpoint at most 2 * every - 1 steps behind the last step it recorded
(tools/fault_drill.py checks exactly that), and loses nothing else.

What stops a run is one of RUN_ERRORS (each an fmjax.errors.Failure or an
older kind, with a one-line message naming the path or value and the fix): a
workdir that is a file or cannot be created, a failed checkpoint save (a full
disk: the half-written save is removed), device memory running out
(OutOfMemory), any other operating-system error (OSFailure), data that cannot
be read or has no documents (DataError). Checkpoints already complete are
never touched by such a failure.

Besides the held-out loss (every train.eval_every steps), train.eval_suite runs an
evaluation suite (fmjax.evaluation) on the live parameters on the training mesh:
at the end, and every train.eval_suite_every steps. Its data is read before the
first step, so a bad suite stops the run before anything is written.

With several processes (fmjax.runtime.distributed), each reads the rows of the batch
its devices hold; only process 0 writes records, plots and console output;
all of them save and restore checkpoints together. SIGTERM, Ctrl-C or the end
of train.max_runtime stops every process after the same step, with a
checkpoint (fmjax.train.preemption).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import sys
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from fmjax import config as config_lib
from fmjax.data import pipeline, tokenizer as tokenizer_lib
from fmjax.errors import Failure, UsageError
from fmjax.evaluation import run as eval_run, suite as suite_lib
from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import cost, decoding, sharding
from fmjax.posttrain import plan, rl as rl_lib
from fmjax.runtime import distributed
from fmjax.train import checkpoint as checkpoint_lib, inputs
from fmjax.train import guard as guard_lib, metrics as metrics_lib
from fmjax.train import preemption, profiling, records, state as state_lib, step as step_lib
from fmjax.train import workdir as workdir_lib


class DataError(RuntimeError):
  """The corpus or tokenizer files under data.data_dir cannot be read, or hold no documents."""


class OutOfMemory(Failure):
  """The devices (or the host) ran out of memory: the message names the sizes and the fixes."""


class OSFailure(Failure):
  """The operating system refused a read or write (disk full, permissions, a vanished file)."""


# What stops a run after its config passed: each with a one-line message.
RUN_ERRORS = (DataError, workdir_lib.WorkdirLocked, checkpoint_lib.CheckpointError,
              checkpoint_lib.NonFiniteCheckpoint, guard_lib.NonFiniteError,
              FormatError,  # an init_from HF tensor found bad only when read (NaN)
              Failure)  # WorkdirError, CheckpointSaveError, OutOfMemory, OSFailure, WandbError


@contextlib.contextmanager
def _data_errors(data_dir):
  """Turns a failure to read or build the data into a one-line DataError."""
  try:
    yield
  except config_lib.ConfigError:
    raise
  except pipeline.BadDataError as e:  # names the source, file or record, and the fix
    raise DataError(str(e)) from None
  except StopIteration:  # not `from e`: contextlib would raise the StopIteration again
    raise DataError(f"data.data_dir={data_dir}: the train stream ended before its first "
                    "batch: data.mixture has no usable documents; check its sources") from None
  except Exception as e:  # sentencepiece, tfds, array_record and grain raise many kinds
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise DataError(f"data.data_dir={data_dir}: cannot read the corpus or tokenizer there "
                    f"({type(e).__name__}: {first}); delete the damaged files to have them "
                    "rebuilt, or point data.data_dir elsewhere") from e


def run(cfg, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `cfg` in `workdir` (resuming if it has checkpoints); returns the run summary
  ({"stopped": reason, "step": n} if SIGTERM, Ctrl-C or train.max_runtime stopped it).

  Raises ConfigError before writing anything if `workdir` has checkpoints of a
  config that computes something else (unless `allow_config_change`) or of
  another shape; one of RUN_ERRORS if the run cannot go on.
  """
  started = time.time()
  # From here on, SIGTERM and Ctrl-C stop the run cleanly after its current step.
  with preemption.Stop(preemption.parse_duration(cfg.train.max_runtime), started) as stop:
    try:
      return _run(cfg, workdir, allow_config_change, stop, started)
    except (jax.errors.JaxRuntimeError, MemoryError) as e:
      if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        raise OutOfMemory(_out_of_memory(cfg, e)) from e
      raise
    except OSError as e:
      raise OSFailure(_os_failure(e, workdir)) from e


def _run(cfg, workdir, allow_config_change, stop, started) -> dict:
  """Makes the workdir (said now if it cannot be, not after the data is built), then
  `_build_and_train`; if that fails, a workdir made here is removed again if it holds
  no file."""
  created = workdir_lib.create(workdir)
  try:
    return _build_and_train(cfg, workdir, allow_config_change, stop, started)
  except BaseException:
    if created:
      _remove_empty_directories(workdir)
    raise


def _build_and_train(cfg, workdir, allow_config_change, stop, started) -> dict:
  t, d = cfg.train, cfg.data
  if t.wandb_project:
    metrics_lib.import_wandb(t.wandb_project)  # missing: said before anything is built
  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)  # raises ConfigError on a sharding that cannot work
  checkpoints = checkpoint_lib.run_directory(workdir, cfg.checkpoint.root)
  if jax.process_index() == 0:
    for line in records.startup_lines(cfg, s, workdir, checkpoints):
      _say(line)
  with _data_errors(os.path.expanduser(d.data_dir)):
    try:  # missing data, tokenizer or init checkpoint: an error before anything is written
      tok = tokenizer_lib.from_config(d, cfg.model.vocab_size)
      pipeline.check_vocab(tok, cfg.model.vocab_size, d)
      pipeline.open_sources(d, "train")
      pipeline.open_sources(d, "validation")
      if cfg.checkpoint.init_from:
        checkpoint_lib.check_init_from(cfg.checkpoint.init_from, cfg.model)
      if cfg.objective.name == "dpo" or plan.needs_reference(cfg):  # a workdir or HF directory
        checkpoint_lib.check_init_from(plan.reference_path(cfg), cfg.model)
      suite = suite_lib.load_suite(t.eval_suite, d.data_dir) if t.eval_suite else []
      eval_run.check_context(suite, tok, d.seq_len)
      rows = distributed.host_rows(s.batch_sharding, t.batch_size)  # this process's rows
      shards = d.shards or jax.process_count()
      pipeline.host_shards(t.batch_size, rows, shards)
    except pipeline.EmptySourceError as e:
      raise DataError(str(e)) from None
    except UsageError as e:
      raise config_lib.ConfigError(f"train.eval_suite={t.eval_suite!r}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(str(e)) from None
    train_ds, eval_data = inputs.datasets(
        cfg, tok, batch_size=t.batch_size, rows=rows, shards=shards,
        process_count=jax.process_count(), batch_shards=math.prod(
            mesh.shape[a] for a in sharding.parse_axes(cfg.sharding.activations.batch)))
    if not eval_data:
      raise DataError(f"the validation split of data.mixture={d.mixture!r} does not fill one "
                      f"held-out batch of train.batch_size={t.batch_size} x data.seq_len="
                      f"{d.seq_len} tokens; add validation documents")
    train_ds, eval_data, frozen = inputs.frozen_inputs(s, tok, train_ds, eval_data)
    train_iter = iter(train_ds)
    _probe(train_iter)

  # Process 0 holds the lock: the others may share its workdir (fmjax.launch_local).
  lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, checkpoint_lib.Checkpointer(checkpoints, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save,
                                         cleanup=True) as ckpt:
    workdir_lib.check_config(workdir, cfg.to_dict(), allow_config_change,
                             has_checkpoint=bool(ckpt.all_steps()))
    return _train(cfg, workdir, s, tok, train_iter, eval_data, ckpt, started, stop, frozen,
                  suite)


def _remove_empty_directories(path: str):
  """Removes `path` and the directories under it if none of them holds a file."""
  for root, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
    with contextlib.suppress(OSError):
      os.rmdir(root)


def _out_of_memory(cfg, e) -> str:
  t, d = cfg.train, cfg.data
  first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  params = cost.param_counts(cfg.model)["total"]
  return (f"out of memory ({first}) with {params / 1e6:.1f}M parameters, train.batch_size="
          f"{t.batch_size} x data.seq_len={d.seq_len} on {jax.device_count()} devices; lower "
          "train.batch_size or raise train.microbatches, set model.remat='full', shard over "
          "more devices (mesh.fsdp), or train a smaller model; the checkpoints are as they were")


def _os_failure(e: OSError, workdir: str) -> str:
  where = f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else str(e)
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = "free space there, then run the same command to resume from the last checkpoint"
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = f"make it writable (or use another --workdir than {workdir}), then run the same command"
  else:
    fix = "fix the cause, then run the same command to resume from the last checkpoint"
  return f"{where}; {fix}"


def _probe(iterator):
  """Reads one batch and rewinds: damaged data is reported as such now, not at restore."""
  position = copy.deepcopy(iterator.get_state())
  next(iterator)
  iterator.set_state(position)


def _warn(message: str):
  print(message, file=sys.stderr, flush=True)


def _say(message: str):
  """A start-up line, on stderr: stdout keeps the run's results."""
  print(message, file=sys.stderr, flush=True)


def _train(cfg, workdir, s, tok, train_iter, eval_data, ckpt, started, stop, frozen,
           suite) -> dict:
  """The steps, then the final evaluation, checkpoint, summary, plots and sample."""
  run = _Run(cfg, workdir, s, train_iter, eval_data, ckpt, frozen, tok, suite)
  distributed.wait_for_all("fmjax_train_loop")  # no process meets the first collective late
  try:
    with jax.set_mesh(s.mesh):
      stopped = run.train(stop)
      run.close_bar()
      if stopped:
        return run.stopped(stopped)
      run.finish()
  finally:
    run.profiler.stop(run.done)
    run.writer.close()
  summary = run.summary(started)
  if run.is_main:
    _report(cfg, workdir, summary, run.records_path)
  t = cfg.train
  if t.sample_tokens:
    params = _host_copy(run.state["params"])  # a collective: every process takes part
    if run.is_main:
      text = decoding.sample_texts(plan.model_params(params, cfg), s.spec, tok,
                                   [t.sample_prompt], t.sample_tokens, t.sample_temperature,
                                   seed=t.seed)[0]
      print(f"sample: {text}")
  return summary


def _restore_or_init(cfg, s, ckpt, train_iter):
  """(state, progress saved beside it, whether it was restored) at the start of a run."""
  restored = ckpt.restore_latest(s.abstract_state, train_iter, warn=_warn)
  main = jax.process_index() == 0
  if restored is not None:
    if main:
      print(f"resuming from checkpoint {restored.step}", flush=True)
    return restored.state, restored.progress, True
  params = None
  if cfg.checkpoint.init_from:  # parameters only: fresh optimizer, step 0
    params = inputs.restore_params(cfg.checkpoint.init_from, s.abstract_state["params"],
                                      cfg.model)
    if main:
      _say(f"start: no checkpoint in {ckpt.directory}; parameters from checkpoint.init_from="
           f"{cfg.checkpoint.init_from}, a fresh optimizer at step 0")
  elif main:
    _say(f"start: no checkpoint in {ckpt.directory}; random parameters (train.seed="
         f"{cfg.train.seed})")
  return state_lib.init_state(s, cfg.train.seed, params), {}, False


class _Run:
  """A run's mutable state between steps, and what the loop does to it.

  `done` steps are done; `drawn` batches were taken from train_iter, over all
  restarts. `pending` holds the last step's metrics, still on device, until
  `flush` fetches them: the next step is dispatched first. `clock` is when the
  last step was flushed (or the loop last paused, to evaluate or save).
  Records are opened (`open_records`) once the first step has compiled. `suite` is
  train.eval_suite, loaded (fmjax.evaluation.suite), or [].
  """

  def __init__(self, cfg, workdir, s, train_iter, eval_data, ckpt, frozen, tok, suite):
    t = self.t = cfg.train
    self.cfg, self.workdir, self.s, self.train_iter, self.eval_data, self.ckpt = (
        cfg, workdir, s, train_iter, eval_data, ckpt)
    self.is_main = jax.process_index() == 0
    self.state, progress, restored = _restore_or_init(cfg, s, ckpt, train_iter)
    self.start = self.done = int(jax.device_get(self.state["step"]))
    self.drawn = progress.get("batches", self.start)
    self.guard = guard_lib.Guard(t, progress.get("guard"))
    self.poisoned = guard_lib.injected_nan_batches()
    self.records_path = os.path.join(workdir, "metrics.jsonl")
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main,
                                            wandb_project=t.wandb_project, config=cfg.to_dict())
    self.records_open = False
    if not restored and t.nonfinite == "restore":
      self.save(0)  # something to go back to
    self.rollouts = inputs.rollouts(s, tok, frozen)  # RL: batches are the policy's rollouts
    self.train_step = (self.rollouts.train_step if self.rollouts
                       else step_lib.make_train_step(s, frozen))
    self.eval_step = None if self.rollouts else step_lib.make_eval_step(s, frozen)
    # MFU as the benchmark quotes it: causal attention counted as half the square.
    self.flops_per_token = cost.flops_per_token(cfg.model, cfg.data.seq_len, attention="causal")
    self.peak, self.peak_source = cost.peak_flops(cfg.model.dtype)
    self.tokens_per_step = t.batch_size * cfg.data.seq_len
    self.profiler = profiling.Profiler(t.profile_steps, workdir, enabled=self.is_main,
                                       log=self.write)
    self.bar = None  # the progress bar, from the first compiled step on
    self.pending = None  # (step, batch number, metrics still on device)
    self.clock = time.perf_counter()
    self.step_times = []
    self.eval_loss = None
    self.tok, self.suite, self.suite_results = tok, suite, None

  def open_records(self):
    """config.json, and the records truncated to the step resumed from (those past it came
    from a run that died)."""
    if self.records_open:
      return
    self.records_open = True
    if self.is_main:
      records.write_json(os.path.join(self.workdir, "config.json"), self.cfg.to_dict())
      metrics_lib.truncate(self.records_path, self.start)

  def write(self, message: str):
    """A console line (process 0), above the progress bar if there is one."""
    if not self.is_main:
      return
    if self.bar is not None:
      self.bar.write(message)
    else:
      print(message, flush=True)

  def close_bar(self):
    if self.bar is not None:
      self.bar.close()

  def train(self, stop) -> str:
    """Steps up to train.steps; returns why it stopped before them ('' if it did not)."""
    t = self.t
    while self.done < t.steps:
      bad = self.step()
      evaluate_now, save_now = self._due(t.eval_every), self._due(self.cfg.checkpoint.every)
      suite_now = bool(self.suite) and self._due(t.eval_suite_every)
      if bad is None and (evaluate_now or save_now or suite_now or self.done == t.steps):
        bad = self.flush()
      if bad is not None:
        self.rewind(bad)
        continue
      stopped = stop.poll()  # every process, every step: they agree on the step to stop at
      if stopped and self.done < t.steps:
        self.flush()
        self.save(self.done, force=True)
        return stopped
      if evaluate_now:
        self.evaluate(self.done, self.write)
        self.clock = time.perf_counter()
      if suite_now:
        self.evaluate_suite(self.done, self.write)
        self.clock = time.perf_counter()
      if save_now:
        self.save(self.done)
        self.clock = time.perf_counter()
    return ""

  def _due(self, every) -> bool:
    return bool(every and self.done % every == 0 and self.done != self.t.steps)

  def step(self):
    """Dispatches the next batch's step, then flushes the previous one (see `flush`).

    The first call compiles the step: it says so before, and how long it took after.
    """
    self.drawn += 1
    batch = guard_lib.inject(next(self.train_iter), self.drawn, self.poisoned)
    compiling = not self.records_open
    if compiling and self.is_main:
      _say("compiling the train step...")
    self.profiler.before(self.done + 1)
    began = time.perf_counter()
    if self.rollouts:  # prompts in, rollouts of the current parameters out (fmjax.posttrain.rl)
      batch, host = self.rollouts.rollout(self.state["params"], batch, self.drawn)
    else:
      batch, host = distributed.global_batch(batch, self.s.batch_sharding), {}
    self.state, metrics = self.train_step(self.state, batch)
    metrics = dict(metrics, **host)
    self.profiler.after(self.done + 1, metrics)
    if compiling:
      if self.is_main:
        _say(f"compiled the train step in {time.perf_counter() - began:.1f} s")
      self.open_records()
      self.bar = tqdm.tqdm(total=self.t.steps, initial=self.start, unit="step",
                           dynamic_ncols=True, disable=not (self.is_main and self.t.progress))
      self.clock = time.perf_counter()
    bad = self.flush()  # the previous step's metrics, while this one runs
    self.done += 1
    self.pending = (self.done, self.drawn, metrics)
    self.bar.update(1)
    return bad

  def flush(self):
    """Fetches, checks and logs the pending step; its time is the wall time since `clock`.

    Before step s is recorded, a save still in flight of step s - checkpoint.every
    or earlier is waited for (the bound on what a kill loses, in the module
    docstring); a save that has finished meanwhile is completed, or its error raised.
    Returns the step's batch number if the guard asks to go back to the last
    checkpoint, else None.
    """
    if self.pending is None:
      return None
    (step, number, on_device), self.pending = self.pending, None
    stats = jax.device_get(on_device)
    every = self.cfg.checkpoint.every
    if every:
      self.ckpt.wait_through(step - every)
    self.ckpt.poll()
    now = time.perf_counter()
    self.step_times.append(now - self.clock)
    self.clock = now
    record = records.step_record(stats, self.step_times[-1], self.tokens_per_step,
                                 self.flops_per_token, self.peak)
    try:
      verdict = self.guard.check(step, record)
    except guard_lib.NonFiniteError:
      self.writer.write(step, record)
      raise
    record.update(verdict.record)
    for message in verdict.messages:
      self.write(message)
    if verdict.log or step % self.t.log_every == 0 or step == self.t.steps:
      self.writer.write(step, record)
    self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                         refresh=False)
    return number if verdict.restore else None

  def rewind(self, bad_number: int):
    """Goes back to the last checkpoint, with train_iter past batch `bad_number`."""
    self.pending = None
    r = self.ckpt.restore_latest(self.s.abstract_state, self.train_iter, warn=_warn)
    if r is None:
      raise guard_lib.NonFiniteError(f"no checkpoint in {self.ckpt.directory} to go back to")
    skip = bad_number - r.progress.get("batches", r.step)
    for _ in range(skip):
      next(self.train_iter)
    if self.is_main:
      metrics_lib.truncate(self.records_path, r.step)
    self.writer.write(r.step, {"event": "nonfinite_restore", "skipped_batches": skip,
                               "last_bad_batch": bad_number})
    self.write(f"restored checkpoint {r.step} and skipped {skip} batches")
    self.bar.n = r.step
    self.bar.refresh()
    self.state, self.done, self.drawn = r.state, r.step, bad_number
    self.guard = guard_lib.Guard(self.t, r.progress.get("guard"))
    self.guard.restored()
    self.clock = time.perf_counter()

  def save(self, step: int, force: bool = False):
    self.ckpt.save(step, self.state, self.train_iter, force=force,
                   progress={"batches": self.drawn, "guard": self.guard.state()})

  def evaluate(self, step: int, write):
    """Records held-out statistics of the current parameters; `write` prints the message."""
    if self.rollouts:  # held-out pass@1 and reward
      result = self.rollouts.evaluate(self.state["params"], self.eval_data)
    else:
      result = step_lib.evaluate(self.s, self.eval_step, self.state["params"], self.eval_data)
    self.writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    if self.is_main:
      sampled = (f", sampled {result['sampled_accuracy']:.3f}" if "sampled_accuracy" in result
                 else "")
      write(f"step {step}: held-out loss {result['loss']:.4f}, "
            f"accuracy {result['accuracy']:.3f}{sampled}")
    self.eval_loss = result["loss"]

  def evaluate_suite(self, step: int, write):
    """Runs train.eval_suite on the live parameters, on the training mesh (every process
    takes part): its metrics into the records as suite/TASK/METRIC, its records and
    reliability diagrams into <workdir>/eval/step_N/ (as `python -m fmjax.eval` writes)."""
    params = plan.model_params(self.state["params"], self.cfg)
    results = eval_run.run_suite(params, self.s.spec, self.tok, self.suite, self.s.mesh,
                                 seq_len=self.cfg.data.seq_len, step=step)
    self.writer.write(step, eval_run.flat_metrics(results))
    if self.is_main:
      out = os.path.join(self.workdir, "eval", f"step_{step}")
      eval_run.write_outputs(results, out)
      write(f"step {step}: suite {self.t.eval_suite}: {eval_run.headline(results)} ({out})")
    self.suite_results = results

  def stopped(self, reason: str) -> dict:
    """Ends a run stopped before train.steps (its checkpoint saved): how to resume."""
    self.ckpt.wait()
    self.writer.close()
    if self.is_main:
      print(f"stopped at step {self.done} of {self.t.steps} ({reason}): checkpoint "
            f"{self.done} saved; run the same command to resume", flush=True)
    return {"stopped": reason, "step": self.done}

  def finish(self):
    """The final evaluation and checkpoint (none if the run had nothing left to do)."""
    self.open_records()
    steps = self.t.steps
    if self.start < steps or self.eval_loss is None:
      self.evaluate(steps, print)
    if self.suite and (self.start < steps or self.suite_results is None):
      self.evaluate_suite(steps, print)
    if self.start < steps:
      self.save(steps, force=True)
    self.ckpt.wait()

  def summary(self, started: float) -> dict:
    cfg, t = self.cfg, self.t
    median_step = float(np.median(self.step_times[1:] or self.step_times or [0.0]))
    tokens_per_s = self.tokens_per_step / median_step if median_step else 0.0
    return records.run_summary(
        cfg, self.s, config_hash=config_lib.config_hash(cfg), steps=t.steps,
        tokens=t.steps * self.tokens_per_step, final_eval_loss=self.eval_loss,
        tokens_per_s=tokens_per_s, mfu=tokens_per_s * self.flops_per_token / self.peak,
        peak_flops=self.peak, peak_source=self.peak_source,
        wall_time_s=time.time() - started, **pipeline.data_metadata(cfg.data),
        **({"suite": eval_run.summary(self.suite_results)} if self.suite_results else {}))


def _report(cfg, workdir, summary, records_path):
  """Process 0's summary.json, plots and closing lines."""
  records.write_json(os.path.join(workdir, "summary.json"), summary)
  metrics_lib.plot_loss_curve(metrics_lib.read(records_path),
                              os.path.join(workdir, "loss_curve.png"),
                              title=f"{cfg.model.n_layers}L d{cfg.model.d_model}, "
                                    f"{summary['params'] / 1e6:.1f}M params")
  loss, peak = summary["final_eval_loss"], summary["peak_flops"]
  print(f"final held-out loss: {loss:.4f} (perplexity {np.exp(loss):.2f}), "
        f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%} of "
        f"{peak / 1e9:.0f} GFLOP/s ({summary['peak_source']})")
  print(f"loss curve: {os.path.join(workdir, 'loss_curve.png')}")
  if metrics_lib.plot_expert_load(metrics_lib.read(records_path),
                                  os.path.join(workdir, "expert_load.png")):
    print(f"expert load: {os.path.join(workdir, 'expert_load.png')}")
  if cfg.objective.name == "grpo":
    rl_lib.plot_rewards(metrics_lib.read(records_path), os.path.join(workdir, "reward_curve.png"))
    print(f"reward curve: {os.path.join(workdir, 'reward_curve.png')}")


def _host_copy(tree):
  """The whole of a sharded tree as numpy arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
