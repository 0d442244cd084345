"""Time and peak memory of `fmjax.convert` on a model of an experiment file, with random weights.

  python tools/bench_convert.py --config=experiments/bench_dense_1b.py --dir=/tmp/convert_1b

Writes DIR/run (an fmjax workdir holding one checkpoint of random float32
parameters, made one parameter at a time), then runs, each as its own
process, `to-hf` (DIR/run -> DIR/hf), `from-hf` (DIR/hf -> DIR/back) and
`to-hf` again (DIR/back -> DIR/hf2), and reports each one's wall time and peak
resident memory (the process's ru_maxrss), the model's size, and whether
DIR/hf2 is byte-identical to DIR/hf. Needs about 4x the model's float32
size on disk. Figures: tools/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_workdir(config_file: str, workdir: str, seed: int = 0) -> int:
  """A workdir with random parameters of the experiment's model; returns their number."""
  import importlib.util

  import jax
  import numpy as np

  from fmjax import checkpoint, config as config_lib, model, sizing
  from fmjax.params import Param, ones

  spec = importlib.util.spec_from_file_location("experiment", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = sizing.resolve(module.get_config())
  rng = np.random.default_rng(seed)

  def draw(p: Param):
    x = rng.standard_normal(p.shape, dtype=np.float32)
    x *= 0.02
    return jax.device_put(x + 1 if p.init is ones else x, jax.devices("cpu")[0])

  params = jax.tree.map(draw, model.param_decls(cfg.model),
                                      is_leaf=lambda x: isinstance(x, Param))
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1,
                               async_save=False, save_gb_in_flight=1) as ckpt:
    ckpt.save(0, {"params": params})
  return sum(x.size for x in jax.tree.leaves(params))


def timed(args: list[str]) -> dict:
  """Runs `python -m fmjax.convert ARGS`; its wall time (s) and peak RSS (GiB)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "fmjax.convert", *args], env=env)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"fmjax.convert {' '.join(args)} failed")
  return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/bench_dense_1b.py")
  parser.add_argument("--dir", required=True, help="a new directory for the checkpoints")
  parser.add_argument("--max_shard_gb", default="2")
  args = parser.parse_args()
  d = os.path.abspath(args.dir)
  if os.path.exists(d):
    raise SystemExit(f"--dir={d} exists; give a new directory")
  start = time.perf_counter()
  n = make_workdir(args.config, os.path.join(d, "run"))
  made = time.perf_counter() - start
  shard = f"--max_shard_gb={args.max_shard_gb}"
  out = {"config": args.config, "params": n, "float32_gib": round(4 * n / 2**30, 2),
         "make_random_workdir_s": round(made, 1),
         "to_hf": timed(["to-hf", f"--workdir={d}/run", f"--out={d}/hf", "--tokenizer=none", shard]),
         "from_hf": timed(["from-hf", f"--hf={d}/hf", f"--out={d}/back"]),
         "to_hf_again": timed(["to-hf", f"--workdir={d}/back", f"--out={d}/hf2",
                               "--tokenizer=none", shard])}
  names = sorted(os.listdir(f"{d}/hf"))
  out["hf_files"] = names
  out["round_trip_identical"] = (names == sorted(os.listdir(f"{d}/hf2")) and not any(
      filecmp.cmpfiles(f"{d}/hf", f"{d}/hf2", names, shallow=False)[1:]))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
