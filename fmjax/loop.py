"""The training loop: data in, steps, records, evaluations and checkpoints out.

A run resumes from the latest checkpoint in its workdir. Metrics of step t are
fetched only after step t+1 has been dispatched, so the device never waits on
logging.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np
import tqdm

from fmjax import checkpoint as checkpoint_lib
from fmjax import config as config_lib
from fmjax import cost, metrics as metrics_lib, sample, sharding, train
from fmjax.data import pipeline, tokenizer as tokenizer_lib


def config_hash(cfg) -> str:
  return hashlib.sha256(config_lib.to_json(cfg).encode()).hexdigest()[:12]


def run(cfg, workdir: str) -> dict:
  """Trains `cfg` in `workdir` (resuming if it has checkpoints); returns the run summary."""
  started = time.time()
  t, d = cfg.train, cfg.data
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  s = train.setup(cfg, mesh)  # raises ConfigError on a sharding that cannot work
  try:  # missing data, tokenizer or init checkpoint: an error before anything is written
    tok = tokenizer_lib.from_config(d, cfg.model.vocab_size)
    pipeline.check_vocab(tok, cfg.model.vocab_size, d)
    pipeline.open_sources(d, "train")
    if cfg.checkpoint.init_from:
      checkpoint_lib.latest_checkpoint(cfg.checkpoint.init_from)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(str(e)) from None
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    train.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())

  per_host_batch = t.batch_size // jax.process_count()
  train_iter = iter(pipeline.train_dataset(
      d, tok, batch_size=per_host_batch, process_index=jax.process_index(),
      process_count=jax.process_count()))
  eval_data = pipeline.eval_batches(d, tok, batch_size=per_host_batch,
                                    num_batches=d.eval_batches)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is None:
    params = None
    if cfg.checkpoint.init_from:  # parameters only: fresh optimizer, step 0
      params = checkpoint_lib.restore_params(cfg.checkpoint.init_from,
                                             s.abstract_state["params"])
    state = train.init_state(s, t.seed, params)
  else:
    state = ckpt.restore(latest, s.abstract_state, train_iter)
  start = int(jax.device_get(state["step"]))

  records_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:  # records past the checkpoint came from a run that died; drop them
    metrics_lib.truncate(records_path, start)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

  train_step = train.make_train_step(s)
  eval_step = train.make_eval_step(s)
  flops_per_token = cost.flops_per_token(cfg.model, d.seq_len)
  peak, peak_source = cost.peak_flops(cfg.model.dtype)
  tokens_per_step = t.batch_size * d.seq_len

  bar = tqdm.tqdm(total=t.steps, initial=start, disable=not (is_main and t.progress),
                  unit="step", dynamic_ncols=True)
  pending = []  # [(step, metrics still on device)]: at most one
  clock = [time.perf_counter()]
  eval_loss = None
  step_times = []

  def flush():
    """Fetches and logs the pending step; its time is the wall time since the last one."""
    if not pending:
      return
    step, on_device = pending.pop()
    stats = jax.device_get(on_device)
    now = time.perf_counter()
    step_times.append(now - clock[0])
    clock[0] = now
    record = train.step_record(stats, step_times[-1], tokens_per_step, flops_per_token, peak)
    if step % t.log_every == 0 or step == t.steps:
      writer.write(step, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False)

  with jax.set_mesh(mesh):
    for step in range(start, t.steps):
      batch = train.global_batch(next(train_iter), s.batch_sharding)
      state, step_metrics = train_step(state, batch)
      flush()  # the previous step's metrics, while this one runs
      pending.append((step + 1, step_metrics))
      bar.update(1)
      done = step + 1
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        flush()
        eval_loss = _eval(s, eval_step, state, eval_data, writer, done, bar)
        clock[0] = time.perf_counter()
      if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps:
        flush()
        ckpt.save(done, state, train_iter)
        clock[0] = time.perf_counter()
    flush()
    bar.close()
    if start < t.steps or eval_loss is None:
      eval_loss = _eval(s, eval_step, state, eval_data, writer, t.steps, None)
    if start < t.steps:
      ckpt.save(t.steps, state, train_iter, force=True)
    ckpt.wait()
    ckpt.close()
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
    if t.sample_tokens:
      text = sample.sample_text(jax.device_get(state["params"]), cfg, tok, t.sample_prompt,
                                t.sample_tokens, t.sample_temperature, seed=t.seed)
      print(f"sample: {text}")
  return summary


def _eval(s, eval_step, state, eval_data, writer, step, bar) -> float:
  result = train.evaluate(s, eval_step, state["params"], eval_data)
  writer.write(step, {f"eval_{k}": v for k, v in result.items()})
  message = f"step {step}: held-out loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}"
  (bar.write if bar is not None else print)(message)
  return result["loss"]
