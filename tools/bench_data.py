"""Pipeline tokens/s next to the default model's training tokens/s, and their ratio.

  python tools/bench_data.py                      # kjv, then kjv with 2 workers, synthetic, a mixture
  python tools/bench_data.py --mixture="kjv:0.5, synthetic:0.5" --num_workers=2
  python tools/bench_data.py --train_tokens_per_s=3605   # skip timing the train step

The train step is timed on the default experiment (experiments/pretrain_tiny.py,
8 fake CPU devices): the median of --train_steps steps after compilation. The
pipeline is timed on the same shapes (per-host batch 16 x 256 tokens), the
median rate over --batches batches after the first --warmup (which include
starting workers and building the corpus). The pipeline must run at least 20x
faster than training consumes, so that it is never the bottleneck.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()


def default_config():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "pretrain_tiny.py")
  spec = importlib.util.spec_from_file_location("pretrain_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_tokens_per_s(cfg, steps: int) -> float:
  """Median training tokens/s of the default experiment (compilation excluded)."""
  import jax
  import numpy as np
  from fmjax.nn import sharding
  from fmjax.runtime import distributed
  from fmjax.train import state as state_lib, step as step_lib
  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  state = state_lib.init_state(s, 0)
  step = step_lib.make_train_step(s)
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = {"tokens": rng.integers(4, cfg.model.vocab_size, shape, dtype=np.int32),
           "segment_ids": np.ones(shape, np.int32),
           "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}
  times = []
  with jax.set_mesh(mesh):
    gb = distributed.global_batch(batch, s.batch_sharding)
    for _ in range(steps + 1):
      t = time.perf_counter()
      state, metrics = step(state, gb)
      jax.block_until_ready(metrics)  # one step in flight: XLA:CPU deadlocks on many
      times.append(time.perf_counter() - t)
  return shape[0] * shape[1] / float(np.median(times[1:]))


def pipeline_tokens_per_s(cfg, mixture: str, num_workers: int, batches: int, warmup: int):
  import numpy as np
  from fmjax.data import pipeline, tokenizer
  d = cfg.data.copy_and_resolve_references()
  d.update(mixture=mixture, num_workers=num_workers)
  tok = tokenizer.from_config(d, cfg.model.vocab_size)
  it = iter(pipeline.train_dataset(d, tok, batch_size=cfg.train.batch_size))
  for _ in range(warmup):
    next(it)
  chunk = 25  # time chunks of batches: the median of their rates
  rates = []
  for _ in range(max(1, batches // chunk)):
    t = time.perf_counter()
    for _ in range(chunk):
      b = next(it)
    rates.append(chunk * b["tokens"].size / (time.perf_counter() - t))
  it.close()
  return float(np.median(rates))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--mixture", default="", help="one mixture to time; default: a few")
  p.add_argument("--num_workers", type=int, default=0)
  p.add_argument("--batches", type=int, default=500)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--train_steps", type=int, default=8)
  p.add_argument("--train_tokens_per_s", type=float, default=0.0,
                 help="use this training rate instead of timing the train step")
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  cfg = default_config()
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  train_rate = args.train_tokens_per_s or train_tokens_per_s(cfg, args.train_steps)
  print(f"default model (experiments/pretrain_tiny.py) trains at {train_rate:,.0f} tokens/s "
        f"({'given' if args.train_tokens_per_s else 'timed'})")
  runs = ([(args.mixture, args.num_workers)] if args.mixture else
          [("kjv", 0), ("kjv", 2), ("synthetic", 0), ("kjv:0.5, synthetic:0.5", 0)])
  print(f"{'mixture':<28} {'workers':>7} {'pipeline tokens/s':>18} {'x training':>11}")
  worst = None
  for mixture, workers in runs:
    rate = pipeline_tokens_per_s(cfg, mixture, workers, args.batches, args.warmup)
    ratio = rate / train_rate
    worst = ratio if worst is None else min(worst, ratio)
    print(f"{mixture:<28} {workers:>7} {rate:>18,.0f} {ratio:>10.0f}x")
  print(f"lowest ratio {worst:.0f}x: {'OK' if worst >= 20 else 'BELOW'} the required 20x")
  return 0 if worst >= 20 else 1


if __name__ == "__main__":
  sys.exit(main())
