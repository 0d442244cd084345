"""The training loop: data in, steps, records, evaluations and checkpoints out.

A run holds its workdir's lock and resumes from the latest usable checkpoint
there (see fmjax.train.checkpoint); no file in the workdir is written before that
restore has succeeded. Metrics of step t are fetched only after step t+1 has
been dispatched, so the device never waits on logging; fmjax.train.guard reads them
for non-finite steps and loss spikes.

With several processes (fmjax.runtime.distributed), each reads the rows of the batch
its devices hold; only process 0 writes records, plots and console output;
all of them save and restore checkpoints together. SIGTERM or the end of
train.max_runtime stops every process after the same step, with a checkpoint
(fmjax.train.preemption).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import sys
import time

import jax
import numpy as np
import tqdm

from fmjax.train import checkpoint as checkpoint_lib
from fmjax import config as config_lib
from fmjax.nn import cost
from fmjax.runtime import distributed
from fmjax.train import guard as guard_lib, metrics as metrics_lib
from fmjax.hf import formats as hf
from fmjax.posttrain import plan as posttrain
from fmjax.train import preemption, state as train
from fmjax import sample
from fmjax.nn import sharding
from fmjax.train import workdir as workdir_lib
from fmjax.data import pipeline, tokenizer as tokenizer_lib


def config_hash(cfg) -> str:
  return hashlib.sha256(config_lib.to_json(cfg).encode()).hexdigest()[:12]


class DataError(RuntimeError):
  """The corpus or tokenizer files under data.data_dir cannot be read."""


# What stops a run after its config passed: each with a one-line message.
RUN_ERRORS = (DataError, workdir_lib.WorkdirLocked, checkpoint_lib.CheckpointError,
              checkpoint_lib.NonFiniteCheckpoint, guard_lib.NonFiniteError,
              hf.FormatError)  # an init_from HF tensor found bad only when read (NaN)


@contextlib.contextmanager
def _data_errors(data_dir):
  """Turns a failure to read or build the data into a one-line DataError."""
  try:
    yield
  except config_lib.ConfigError:
    raise
  except Exception as e:  # sentencepiece, tfds, array_record and grain raise many kinds
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise DataError(f"data.data_dir={data_dir}: cannot read the corpus or tokenizer there "
                    f"({type(e).__name__}: {first}); delete the damaged files to have them "
                    "rebuilt, or point data.data_dir elsewhere") from e


def run(cfg, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `cfg` in `workdir` (resuming if it has checkpoints); returns the run summary.

  Raises ConfigError before writing anything if `workdir` was made by a config
  that computes something else (unless `allow_config_change`) or holds
  checkpoints of another shape; one of RUN_ERRORS if the run cannot go on.
  """
  started = time.time()
  # From here on, SIGTERM stops the run cleanly after its current step.
  with preemption.Stop(preemption.parse_duration(cfg.train.max_runtime), started) as stop:
    return _run(cfg, workdir, allow_config_change, stop, started)


def _run(cfg, workdir, allow_config_change, stop, started) -> dict:
  t, d = cfg.train, cfg.data
  mesh = sharding.make_mesh(cfg.mesh)
  s = train.setup(cfg, mesh)  # raises ConfigError on a sharding that cannot work
  with _data_errors(os.path.expanduser(d.data_dir)):
    try:  # missing data, tokenizer or init checkpoint: an error before anything is written
      tok = tokenizer_lib.from_config(d, cfg.model.vocab_size)
      pipeline.check_vocab(tok, cfg.model.vocab_size, d)
      pipeline.open_sources(d, "train")
      if cfg.checkpoint.init_from:
        checkpoint_lib.check_init_from(cfg.checkpoint.init_from, cfg.model)
      if cfg.objective.name == "dpo":
        checkpoint_lib.latest_checkpoint(posttrain.reference_path(cfg))
      rows = distributed.host_rows(s.batch_sharding, t.batch_size)  # this process's rows
      shards = d.shards or jax.process_count()
      pipeline.host_shards(t.batch_size, rows, shards)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(str(e)) from None
    train_ds, eval_data = posttrain.datasets(
        cfg, tok, batch_size=t.batch_size, rows=rows, shards=shards,
        process_count=jax.process_count(), batch_shards=math.prod(
            mesh.shape[a] for a in config_lib.parse_axes(cfg.sharding.activations.batch)))
    train_ds, eval_data, frozen = posttrain.frozen_inputs(s, tok, train_ds, eval_data)
    train_iter = iter(train_ds)
    _probe(train_iter)

  checkpoints = checkpoint_lib.run_directory(workdir, cfg.checkpoint.root)
  os.makedirs(workdir, exist_ok=True)
  # Process 0 holds the lock: the others may share its workdir (fmjax.launch_local).
  lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, checkpoint_lib.Checkpointer(checkpoints, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save,
                                         cleanup=True) as ckpt:
    workdir_lib.check_config(workdir, cfg.to_dict(), allow_config_change)
    return _train(cfg, workdir, s, mesh, tok, train_iter, eval_data, ckpt, started, stop,
                  frozen)


def _probe(iterator):
  """Reads one batch and rewinds: damaged data is reported as such now, not at restore."""
  position = copy.deepcopy(iterator.get_state())
  next(iterator)
  iterator.set_state(position)


def _warn(message: str):
  print(message, file=sys.stderr, flush=True)


def _train(cfg, workdir, s, mesh, tok, train_iter, eval_data, ckpt, started, stop,
           frozen=None) -> dict:
  t, d = cfg.train, cfg.data
  is_main = jax.process_index() == 0
  restored = ckpt.restore_latest(s.abstract_state, train_iter, warn=_warn)
  if restored is None:
    params = None
    if cfg.checkpoint.init_from:  # parameters only: fresh optimizer, step 0
      params = posttrain.restore_params(cfg.checkpoint.init_from, s.abstract_state["params"],
                                        cfg.model)
    state, progress = train.init_state(s, t.seed, params), {}
  else:
    state, progress = restored.state, restored.progress
    if is_main:
      print(f"resuming from checkpoint {restored.step}", flush=True)
  start = int(jax.device_get(state["step"]))
  drawn = progress.get("batches", start)  # batches taken from train_iter, over all restarts
  guard = guard_lib.Guard(t, progress.get("guard"))
  poisoned = guard_lib.injected_nan_batches()

  records_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    train.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    # records past the checkpoint came from a run that died; drop them
    metrics_lib.truncate(records_path, start)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

  def save(step, force=False):
    ckpt.save(step, state, train_iter, progress={"batches": drawn, "guard": guard.state()},
              force=force)

  if restored is None and t.nonfinite == "restore":
    save(0)  # something to go back to

  train_step = train.make_train_step(s, frozen or None)
  eval_step = train.make_eval_step(s, frozen or None)
  flops_per_token = cost.flops_per_token(cfg.model, d.seq_len)
  peak, peak_source = cost.peak_flops(cfg.model.dtype)
  tokens_per_step = t.batch_size * d.seq_len

  bar = tqdm.tqdm(total=t.steps, initial=start, disable=not (is_main and t.progress),
                  unit="step", dynamic_ncols=True)
  pending = []  # [(step, batch number, metrics still on device)]: at most one
  clock = [time.perf_counter()]
  eval_loss = None
  step_times = []

  def flush():
    """Fetches, checks and logs the pending step; its time is the wall time since the last one.

    Returns the step's batch number if the guard asks to go back to the last
    checkpoint, else None.
    """
    if not pending:
      return None
    step, number, on_device = pending.pop()
    stats = jax.device_get(on_device)
    now = time.perf_counter()
    step_times.append(now - clock[0])
    clock[0] = now
    record = train.step_record(stats, step_times[-1], tokens_per_step, flops_per_token, peak)
    try:
      verdict = guard.check(step, record)
    except guard_lib.NonFiniteError:
      writer.write(step, record)
      raise
    record.update(verdict.record)
    for message in verdict.messages if is_main else ():
      bar.write(message)
    if verdict.log or step % t.log_every == 0 or step == t.steps:
      writer.write(step, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False)
    return number if verdict.restore else None

  def go_back(bad_number):
    """The last checkpoint's state, with train_iter past batch `bad_number`."""
    pending.clear()
    r = ckpt.restore_latest(s.abstract_state, train_iter, warn=_warn)
    if r is None:
      raise guard_lib.NonFiniteError(f"no checkpoint in {ckpt.directory} to go back to")
    skip = bad_number - r.progress.get("batches", r.step)
    for _ in range(skip):
      next(train_iter)
    if is_main:
      metrics_lib.truncate(records_path, r.step)
    writer.write(r.step, {"event": "nonfinite_restore", "skipped_batches": skip,
                          "last_bad_batch": bad_number})
    if is_main:
      bar.write(f"restored checkpoint {r.step} and skipped {skip} batches")
    bar.n = r.step
    bar.refresh()
    return r

  distributed.wait_for_all("fmjax_train_loop")  # no process meets the first collective late
  with jax.set_mesh(mesh):
    done, stopped = start, ""
    while done < t.steps:
      drawn += 1
      batch = guard_lib.inject(next(train_iter), drawn, poisoned)
      state, step_metrics = train_step(state, train.global_batch(batch, s.batch_sharding))
      bad = flush()  # the previous step's metrics, while this one runs
      done += 1
      pending.append((done, drawn, step_metrics))
      bar.update(1)
      evaluate_now = t.eval_every and done % t.eval_every == 0 and done != t.steps
      save_now = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps
      if bad is None and (evaluate_now or save_now or done == t.steps):
        bad = flush()
      if bad is not None:
        r = go_back(bad)
        state, done, drawn = r.state, r.step, bad
        guard = guard_lib.Guard(t, r.progress.get("guard"))
        guard.restored()
        clock[0] = time.perf_counter()
        continue
      stopped = stop.poll()  # every process, every step: they agree on the step to stop at
      if stopped and done < t.steps:
        flush()
        save(done, force=True)
        break
      if evaluate_now:
        eval_loss = _eval(s, eval_step, state, eval_data, writer, done, bar)
        clock[0] = time.perf_counter()
      if save_now:
        save(done)
        clock[0] = time.perf_counter()
    bar.close()
    if stopped and done < t.steps:
      ckpt.wait()
      writer.close()
      if is_main:
        print(f"stopped at step {done} of {t.steps} ({stopped}): checkpoint {done} saved; run "
              "the same command to resume", flush=True)
      return {"stopped": stopped, "step": done}
    if start < t.steps or eval_loss is None:
      eval_loss = _eval(s, eval_step, state, eval_data, writer, t.steps, None)
    if start < t.steps:
      save(t.steps, force=True)
    ckpt.wait()
  writer.close()

  median_step = float(np.median(step_times[1:] or step_times or [0.0]))
  tokens_per_s = tokens_per_step / median_step if median_step else 0.0
  summary = train.run_summary(
      cfg, s, config_hash=config_hash(cfg), steps=t.steps, tokens=t.steps * tokens_per_step,
      final_eval_loss=eval_loss, tokens_per_s=tokens_per_s,
      mfu=tokens_per_s * flops_per_token / peak, peak_flops=peak, peak_source=peak_source,
      wall_time_s=time.time() - started, **pipeline.data_metadata(d))
  if is_main:
    train.write_json(os.path.join(workdir, "summary.json"), summary)
    metrics_lib.plot_loss_curve(metrics_lib.read(records_path),
                                os.path.join(workdir, "loss_curve.png"),
                                title=f"{cfg.model.n_layers}L d{cfg.model.d_model}, "
                                      f"{summary['params'] / 1e6:.1f}M params")
    print(f"final held-out loss: {eval_loss:.4f} (perplexity {np.exp(eval_loss):.2f}), "
          f"{tokens_per_s:,.0f} tokens/s, MFU {summary['mfu']:.1%} of {peak / 1e9:.0f} "
          f"GFLOP/s ({peak_source})")
    print(f"loss curve: {os.path.join(workdir, 'loss_curve.png')}")
    if metrics_lib.plot_expert_load(metrics_lib.read(records_path),
                                    os.path.join(workdir, "expert_load.png")):
      print(f"expert load: {os.path.join(workdir, 'expert_load.png')}")
  if t.sample_tokens:
    params = _host_copy(state["params"])  # a collective: every process takes part
    if is_main:
      text = sample.sample_text(params, cfg, tok, t.sample_prompt, t.sample_tokens,
                                t.sample_temperature, seed=t.seed)
      print(f"sample: {text}")
  return summary


def _eval(s, eval_step, state, eval_data, writer, step, bar) -> float:
  result = train.evaluate(s, eval_step, state["params"], eval_data)
  writer.write(step, {f"eval_{k}": v for k, v in result.items()})
  message = f"step {step}: held-out loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}"
  if jax.process_index() == 0:
    (bar.write if bar is not None else print)(message)
  return result["loss"]


def _host_copy(tree):
  """The whole of a sharded tree as numpy arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
