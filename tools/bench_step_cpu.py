"""CPU time and page faults of a train step: figures that hold on a shared machine.

Wall-clock step times on a busy 2-core machine say little; the CPU seconds a
step costs (user + system, all threads) and its page faults barely depend on
the load. Two settings compared this way, or run side by side as two
processes so that the load falls on both alike, give a fair A/B. fmjax's
settings (fmjax/runtime/xla_flags.py, fmjax/runtime/host_malloc.py) against XLA's and glibc's
defaults:

  python tools/bench_step_cpu.py --config=experiments/bench_dense_20m.py --batch=8
  FMJAX_XLA_FLAGS=0 FMJAX_HUGEPAGES=0 \
      python tools/bench_step_cpu.py --config=experiments/bench_dense_20m.py --batch=8

Prints one JSON line: CPU seconds and minor page faults per step, wall seconds
per step, and the CPU seconds of one jitted 2048^3 float32 matmul, with the
model FLOPs per CPU second against the matmul's (model FLOPs count causal
attention, as fmjax.bench's MFU does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_and_faults() -> tuple[float, int]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime, r.ru_minflt


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch", type=int, default=0, help="train.batch_size (0: the config's)")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()

  from fmjax.runtime import xla_flags
  xla_flags.apply()
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_num_cpu_devices", 1)
  from fmjax.train import benchmark as bench
  from fmjax.nn import cost

  spec = importlib.util.spec_from_file_location("experiment", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  if args.batch:
    cfg.train.batch_size = args.batch
  cfg.mesh.update(data=1, fsdp=1, expert=1, tensor=1)

  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  c0, _ = cpu_and_faults()
  for _ in range(5):
    matmul(a).block_until_ready()
  matmul_cpu = (cpu_and_faults()[0] - c0) / 5

  c = bench.compile_step(cfg, devices=jax.devices()[:1])
  state, batch = c.state, c.batch
  with jax.set_mesh(c.setup.mesh):
    for _ in range(2):
      state, m = c.step(state, batch)
      jax.block_until_ready(m)
    c0, f0 = cpu_and_faults()
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = c.step(state, batch)
      jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / args.steps
    c1, f1 = cpu_and_faults()
  step_cpu = (c1 - c0) / args.steps
  flops = cfg.train.batch_size * cfg.data.seq_len * cost.flops_per_token(
      cfg.model, cfg.data.seq_len, attention="causal")
  model_rate, matmul_rate = flops / step_cpu, 2 * 2048**3 / matmul_cpu
  print(json.dumps({
      "config": args.config, "batch": cfg.train.batch_size, "xla_flags": os.environ.get(
          "XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "step_cpu_s": round(step_cpu, 3), "step_wall_s": round(wall, 3),
      "page_faults_per_step": round((f1 - f0) / args.steps),
      "matmul_cpu_s": round(matmul_cpu, 4), "model_gflop_per_cpu_s": round(model_rate / 1e9, 1),
      "matmul_gflop_per_cpu_s": round(matmul_rate / 1e9, 1),
      "model_over_matmul": round(model_rate / matmul_rate, 3)}))


if __name__ == "__main__":
  from fmjax.runtime import host_malloc
  host_malloc.reexec()
  main()
