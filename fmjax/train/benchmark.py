"""Measuring a config's train step: compile time, step time, tokens/s, MFU and memory.

What `python -m fmjax.bench` runs (see fmjax/bench.py for what each figure
means); tools/bench_variants.py and the tests call it directly.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
import time

import jax
import numpy as np

from fmjax.nn import cost, params as params_lib, sharding as sharding_lib
from fmjax.runtime import distributed
from fmjax.train import objectives, state as state_lib, step as step_lib


DOCS_PER_ROW = 4  # documents in a synthetic row, on average


def synthetic_batch(cfg, seed: int = 0, docs_per_row: float = DOCS_PER_ROW) -> dict:
  """A (batch_size, seq_len) batch of random tokens, packed like training data.

  Each row holds several documents, `docs_per_row` on average: every one of
  the T - 1 gaps between tokens starts a new document with the same chance,
  so lengths are random and at least 1 token. Segment ids count the row's
  documents from 1 and positions restart at 0 in each, so attention does the
  segment masking it does on real data. The same `seed` gives the same batch.
  """
  rng = np.random.default_rng(seed)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(1, cfg.model.vocab_size, (B, T), dtype=np.int32)
  starts = np.zeros((B, T), bool)
  starts[:, 1:] = rng.random((B, T - 1)) < min(1.0, (docs_per_row - 1) / max(T - 1, 1))
  index = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {"tokens": tokens,
          "segment_ids": (1 + np.cumsum(starts, axis=1)).astype(np.int32),
          "positions": (index - first).astype(np.int32)}


def bytes_per_device(abstract_tree) -> int:
  """Bytes of the largest per-device share of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def bytes_total(abstract_tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def memory_per_device(compiled) -> dict | None:
  """Per-device bytes from the executable's memory analysis (None if the backend has none).

  peak = arguments + outputs - outputs aliased to (donated) arguments + temporaries.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {f"{k}_bytes": getattr(stats, f"{k}_size_in_bytes")
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def time_steps(step, state, batch, n: int):
  """(state, [seconds from one step's completion to the next's], last step's statistics).

  Step i is dispatched before step i-1 is waited for, so the device never
  idles on the host between them, and never more than two steps are in
  flight. The first step is timed from its dispatch.
  """
  times, pending = [], None
  last = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, batch)
    if pending is not None:
      jax.block_until_ready(pending)
      now = time.perf_counter()
      times.append(now - last)
      last = now
    pending = metrics
  jax.block_until_ready(pending)
  times.append(time.perf_counter() - last)
  return state, times, jax.device_get(pending)


@dataclasses.dataclass
class Compiled:
  """A config's train step, compiled, with a state and a batch to run it on."""
  cfg: object
  setup: object  # fmjax.train.state.Setup
  step: object  # the compiled executable
  state: dict
  batch: dict
  abstract_batch: dict
  lower_s: float
  compile_s: float
  last_stats: dict | None = None  # the statistics of the last step run

  def run(self, n: int) -> list[float]:
    """Runs n more steps; returns their times (see `time_steps`)."""
    with jax.set_mesh(self.setup.mesh):
      self.state, times, self.last_stats = time_steps(self.step, self.state, self.batch, n)
    return times


def compile_step(cfg, devices=None, materialize: bool = True) -> Compiled:
  """Lowers and compiles `cfg`'s train step (timed), and makes its state and batch.

  With `materialize=False` nothing is allocated: only the executable exists.
  """
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  s = state_lib.setup(cfg, mesh)
  batch_np = synthetic_batch(cfg)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding)
                    for k, v in batch_np.items()}
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = step_lib.make_train_step(s).lower(s.abstract_state, abstract_batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    state = state_lib.init_state(s, cfg.train.seed) if materialize else None
    batch = distributed.global_batch(batch_np, s.batch_sharding) if materialize else None
  return Compiled(cfg, s, compiled, state, batch, abstract_batch,
                  lowered_at - start, compiled_at - lowered_at)


def measure(cfg, steps: int = 10, warmup: int = 2, devices=None, peak=None) -> dict:
  """The benchmark record of `cfg` (see the module docstring).

  `devices` defaults to all; `peak` (FLOP/s, source) skips the peak measurement.
  With `steps=0` the step is only compiled: the record has its compile time,
  FLOPs and memory, and no timings.
  """
  c = compile_step(cfg, devices, materialize=steps > 0)
  if not steps:
    return record(c, [], None)
  n_devices = c.setup.mesh.devices.size
  measured_peak = peak is None
  if measured_peak:
    peak = cost.peak_flops(cfg.model.dtype, n_devices)
  if warmup:
    c.run(warmup)
  times = c.run(steps)
  if measured_peak and peak[1].startswith("measured"):  # again, after: the best of both
    peak = max(peak, cost.peak_flops(cfg.model.dtype, n_devices))
  return record(c, times, peak)


MFU_CONVENTION = ("causal attention counted as half the T x T square, (T + 1) / 2 keys per "
                  "query (headline); mfu_full_square counts the whole square")


def record(c: Compiled, times, peak) -> dict:
  """The JSON record of compiled step `c` that ran in `times`, against `peak`.

  `flops_per_token`, `model_flops_per_s` and `mfu` count causal attention
  (each query against itself and the keys before it); the `_full_square`
  figures count every query against all T keys, as XLA's dot products compute
  them and as `xla_flops_per_token` reports.
  """
  cfg, s = c.cfg, c.setup
  n_devices = s.mesh.devices.size
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  flops_per_token = cost.flops_per_token(cfg.model, cfg.data.seq_len, attention="causal")
  flops_full_square = cost.flops_per_token(cfg.model, cfg.data.seq_len, attention="square")
  step_time = statistics.median(times) if times else None
  tokens_per_s = tokens_per_step / step_time if times else None
  flops_per_s = tokens_per_s * flops_per_token if times else None
  compiled_flops = xla_flops(c.step)
  out = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "devices": n_devices,
      "mesh": {k: int(v) for k, v in s.mesh.shape.items()},
      "params": params_lib.count(s.decls),
      "active_params": cost.param_counts(cfg.model)["active"],
      "dtype": cfg.model.dtype,
      "remat": cfg.model.remat,
      "ce_chunk": cfg.objective.ce_chunk,
      "batch_size": cfg.train.batch_size,
      "seq_len": cfg.data.seq_len,
      "microbatches": cfg.train.microbatches,
      "tokens_per_step": tokens_per_step,
      "lower_s": c.lower_s,
      "compile_s": c.compile_s,
      "steps": len(times),
      "step_times_s": times,
      "step_time_s": step_time,
      "tokens_per_s": tokens_per_s,
      "mfu_convention": MFU_CONVENTION,
      "flops_per_token": flops_per_token,
      "flops_per_token_full_square": flops_full_square,
      # Compares with flops_per_token_full_square where attention runs as XLA dot products.
      # XLA counts a while loop's body once: with model.scan_layers this is not the step's total.
      "xla_flops_per_token": compiled_flops / tokens_per_step * n_devices
                             if compiled_flops is not None else None,
      "model_flops_per_s": flops_per_s,
      "peak_flops": peak[0] if peak else None,
      "peak_source": peak[1] if peak else None,
      "mfu": flops_per_s / peak[0] if times else None,
      "mfu_full_square": tokens_per_s * flops_full_square / peak[0] if times else None,
      "memory_per_device": memory_per_device(c.step),
      "state_bytes_per_device": bytes_per_device(s.abstract_state),
      "state_bytes_total": bytes_total(s.abstract_state),
      "batch_bytes_per_device": bytes_per_device(c.abstract_batch),
      "loss": objectives.summarize(c.last_stats)["loss"] if c.last_stats else None,
  }
  if times and not np.isfinite(out["loss"]):
    raise FloatingPointError(f"the benchmarked step's loss is {out['loss']}")
  return out


def _gib(n) -> str:
  return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def table(r: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v != 1) or "1 device"
  mem = r["memory_per_device"]
  xla = r["xla_flops_per_token"]
  rows = [
      ("device", f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {mesh}"),
      ("model", f"{r['params']:,} parameters"
                + (f" ({r['active_params']:,} active)" if r["active_params"] != r["params"] else "")
                + f", {r['dtype']}, remat {r['remat']}, ce_chunk {r['ce_chunk']}"),
      ("batch", f"{r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step"),
      ("compile", f"{r['lower_s']:.2f} s lower + {r['compile_s']:.2f} s compile"),
      ("FLOPs/token", f"{r['flops_per_token'] / 1e6:,.2f} MFLOP (model, causal half), "
                      f"{r['flops_per_token_full_square'] / 1e6:,.2f} MFLOP (full T x T square)" +
                      (f", {xla / 1e6:,.2f} MFLOP (XLA cost analysis)" if xla else "")),
      ("state/device", f"{_gib(r['state_bytes_per_device'])} params + optimizer "
                       f"({_gib(r['state_bytes_total'])} in all)"),
  ]
  if mem:
    rows.append(("memory/device", f"peak {_gib(mem['peak_bytes'])}: arguments "
                 f"{_gib(mem['argument_bytes'])}, temporaries {_gib(mem['temp_bytes'])}"))
  if r["step_time_s"] is not None:
    rows += [
        ("step time", f"{r['step_time_s'] * 1e3:,.1f} ms (median of {r['steps']}, "
                      f"min {min(r['step_times_s']) * 1e3:,.1f}, "
                      f"max {max(r['step_times_s']) * 1e3:,.1f})"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("achieved", f"{r['model_flops_per_s'] / 1e9:,.1f} GFLOP/s (causal half)"),
        ("peak", f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})"),
        ("MFU", f"{r['mfu']:.1%} (causal half; {r['mfu_full_square']:.1%} counting "
                f"the full T x T square)"),
    ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
