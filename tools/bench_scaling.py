"""How step time grows with model size, and how memory per device falls with FSDP.

  python tools/bench_scaling.py [--config=experiments/pretrain_tiny.py] [--sizes=S,M,L,XL]
      [--layouts=1,data8,fsdp8,tensor2data4] [--steps=5] [--warmup=2] [--out=DIR]

Runs `python -m fmjax.bench` once per (model size, mesh layout), each in its own
process (the number of fake CPU devices is fixed when jax starts), on the same
experiment with only the model width/depth and the mesh changed. Prints:

1. step time against the FLOPs prediction, per layout: if the step were all
   matmuls at one speed, time / time(smallest) would equal
   FLOPs / FLOPs(smallest);
2. per size and layout: step time, tokens/s, the slowdown per token against one
   device, and the bytes per device of parameters plus optimizer state, both
   from the state's shardings and from the compiled step's memory analysis
   (its arguments: the state and the batch). With fsdp=n, state per device
   should be about 1/n of the one-device figure.

Records go to DIR/records.jsonl and the tables to DIR/tables.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model sizes: widths divide by 8 (fsdp=8) and head counts by 2 (tensor=2).
SIZES = {
    "S": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384),
    "M": dict(d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512),  # the default
    "L": dict(d_model=320, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=896),
    "XL": dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=1408),  # ~20M
}
LAYOUTS = {
    "1": dict(cpu_devices=1, data=1, fsdp=1, tensor=1),
    "data8": dict(cpu_devices=8, data=8, fsdp=1, tensor=1),
    "fsdp8": dict(cpu_devices=8, data=1, fsdp=8, tensor=1),
    "tensor2data4": dict(cpu_devices=8, data=4, fsdp=1, tensor=2),
}


def run_one(config, size, layout, steps, warmup, out_dir, extra) -> dict:
  path = os.path.join(out_dir, f"{size}_{layout}.json")
  overrides = [f"--config.model.{k}={v}" for k, v in SIZES[size].items()]
  overrides += [f"--config.mesh.{k}={v}" for k, v in LAYOUTS[layout].items()]
  cmd = [sys.executable, "-m", "fmjax.bench", f"--config={config}", f"--steps={steps}",
         f"--warmup={warmup}", f"--json={path}", *overrides, *extra]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  with open(path) as f:
    record = json.load(f)
  record.update(size=size, layout=layout)
  return record


def _mib(n) -> str:
  return f"{n / 2**20:,.2f}"


def tables(records) -> str:
  by = {(r["size"], r["layout"]): r for r in records}
  sizes = [s for s in SIZES if any(k[0] == s for k in by)]
  layouts = [l for l in LAYOUTS if any(k[1] == l for k in by)]
  lines = ["### Step time against the FLOPs prediction", ""]
  for layout in layouts:
    rows = [by[(s, layout)] for s in sizes if (s, layout) in by]
    if not rows:
      continue
    first = rows[0]
    lines += [f"layout `{layout}`", "",
              "| size | params | FLOPs/step (G) | step (ms) | time ratio | FLOPs ratio | "
              "GFLOP/s | MFU |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
      flops = r["flops_per_token"] * r["tokens_per_step"]
      flops0 = first["flops_per_token"] * first["tokens_per_step"]
      lines.append(
          f"| {r['size']} | {r['params'] / 1e6:.2f}M | {flops / 1e9:,.1f} | "
          f"{r['step_time_s'] * 1e3:,.0f} | {r['step_time_s'] / first['step_time_s']:.2f} | "
          f"{flops / flops0:.2f} | {r['model_flops_per_s'] / 1e9:,.1f} | {r['mfu']:.1%} |")
    lines.append("")
  lines += ["### Layouts: time per token and memory per device", "",
            "| size | layout | step (ms) | tokens/s | slowdown vs 1 device | "
            "state/device (MiB, shardings) | state share | arguments/device (MiB, compiled) | "
            "peak/device (MiB, compiled) | MFU |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for s in sizes:
    one = by.get((s, "1"))
    for layout in layouts:
      r = by.get((s, layout))
      if r is None:
        continue
      mem = r["memory_per_device"] or {}
      slow = f"{one['tokens_per_s'] / r['tokens_per_s']:.2f}x" if one else "-"
      share = (f"1/{one['state_bytes_per_device'] / r['state_bytes_per_device']:.2f}"
               if one else "-")
      lines.append(
          f"| {s} | {layout} | {r['step_time_s'] * 1e3:,.0f} | {r['tokens_per_s']:,.0f} | "
          f"{slow} | {_mib(r['state_bytes_per_device'])} | {share} | "
          f"{_mib(mem.get('argument_bytes', 0))} | {_mib(mem.get('peak_bytes', 0))} | "
          f"{r['mfu']:.1%} |")
  return "\n".join(lines) + "\n"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/pretrain_tiny.py")
  p.add_argument("--sizes", default=",".join(SIZES))
  p.add_argument("--layouts", default=",".join(LAYOUTS))
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="runs/bench_scaling")
  p.add_argument("extra", nargs="*", help="more flags for fmjax.bench, after --")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  records = []
  for size in a.sizes.split(","):
    for layout in a.layouts.split(","):
      r = run_one(a.config, size, layout, a.steps, a.warmup, a.out, a.extra)
      print(f"{size:>3} {layout:>13}: {r['step_time_s'] * 1e3:9,.0f} ms/step, "
            f"{r['tokens_per_s']:8,.0f} tokens/s, MFU {r['mfu']:6.1%}, state/device "
            f"{_mib(r['state_bytes_per_device'])} MiB", flush=True)
      records.append(r)
  with open(os.path.join(a.out, "records.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  text = tables(records)
  with open(os.path.join(a.out, "tables.md"), "w") as f:
    f.write(text)
  print()
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
