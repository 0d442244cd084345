"""A/B timing of config variants of one experiment, interleaved in one process.

  python tools/bench_variants.py --config=experiments/bench_dense_20m.py \
      [--rounds=3] [--steps=3] [--out=FILE.jsonl] \
      base  chunk128:objective.ce_chunk=128  dots:model.remat=dots,objective.ce_chunk=128

Each variant is `name[:field=value,...]` (fields as in --config.field=value).
A variant whose mesh names every axis size runs on the first that many devices,
so one process with 8 fake CPU devices can compare 1 device against 8:
`one:mesh.data=1,mesh.fsdp=1,mesh.tensor=1`. All variants are compiled first; then each round runs `--steps` steps of every
variant in turn, so on a shared machine load that comes and goes falls on all
of them alike. Prints, per variant: the median and best step time over all
rounds, the ratio to the first variant, MFU against the best matmul peak
measured before and after (causal attention as the headline, and counting the
full T x T square: fmjax/bench.py), compile time and per-device peak memory.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(path: str):
  """The config of experiment `path` ('FILE' or 'FILE:ARG'), loaded as --config loads it."""
  from fmjax.runtime import cli
  return cli.load_experiment(path)


def apply(cfg, overrides: str):
  """'a.b=1,c.d=x' onto a copy of cfg, each value parsed as the field's type."""
  cfg = cfg.copy_and_resolve_references()
  for item in filter(None, overrides.split(",")):
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, str):
      node[leaf] = value
    elif isinstance(old, bool):
      node[leaf] = value.lower() in ("1", "true", "yes")
    else:
      node[leaf] = type(old)(ast.literal_eval(value))
  return cfg


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default=None)
  p.add_argument("variants", nargs="+")
  a = p.parse_args()

  from fmjax.train import benchmark as bench

  base = load_config(a.config)
  variants = []
  for v in a.variants:
    name, _, overrides = v.partition(":")
    variants.append((name, apply(base, overrides)))
  from fmjax.runtime import xla_flags

  xla_flags.apply()
  import jax

  from fmjax.nn.cost import peak_flops
  from fmjax.nn.sharding import MESH_AXES
  from fmjax.validate import validate

  cpu_devices = max(int(cfg.mesh.cpu_devices) for _, cfg in variants)
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  dtype = variants[0][1].model.dtype
  peaks = [peak_flops(dtype, 1)]
  compiled = []
  for name, cfg in variants:
    sizes = [int(cfg.mesh[a]) for a in MESH_AXES]
    n = math.prod(sizes) if -1 not in sizes else jax.device_count()
    validate(cfg, n)
    c = bench.compile_step(cfg, jax.devices()[:n])
    c.run(1)  # warm-up
    compiled.append((name, c))
    print(f"compiled {name}: {c.compile_s:.1f} s", file=sys.stderr, flush=True)
  times = {name: [] for name, _ in compiled}
  for r in range(a.rounds):
    for name, c in compiled:
      times[name] += c.run(a.steps)
    print(f"round {r + 1}/{a.rounds}: " + ", ".join(
        f"{n} {statistics.median(t) * 1e3:,.0f} ms" for n, t in times.items()),
        file=sys.stderr, flush=True)
  peaks.append(peak_flops(dtype, 1))
  peak = max(peaks)
  records = []
  for name, c in compiled:
    n_devices = c.setup.mesh.devices.size
    device_peak = (peak[0] * (n_devices if peak[1].startswith("datasheet") else 1), peak[1])
    r = bench.record(c, times[name], device_peak)
    r["variant"] = name
    records.append(r)
  first = records[0]["step_time_s"]
  print(f"{'variant':<16} {'median ms':>10} {'best ms':>9} {'vs first':>8} {'MFU':>6} "
        f"{'MFU sq':>6} {'compile s':>9} {'peak MiB/dev':>12}")
  for r in records:
    mem = r["memory_per_device"] or {}
    print(f"{r['variant']:<16} {r['step_time_s'] * 1e3:>10,.0f} "
          f"{min(r['step_times_s']) * 1e3:>9,.0f} {r['step_time_s'] / first:>8.3f} "
          f"{r['mfu']:>6.1%} {r['mfu_full_square']:>6.1%} {r['compile_s']:>9.1f} "
          f"{mem.get('peak_bytes', 0) / 2**20:>12,.0f}")
  print(f"peak: {peak[0] / 1e9:.1f} GFLOP/s ({peak[1]}; best of {len(peaks)} measurements); "
        "MFU counts causal attention, MFU sq the full T x T square")
  if a.out:
    with open(a.out, "a") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
