"""Measure what an experiment costs and how much of the device it uses.

  python -m fmjax.bench --config=experiments/<file>.py[:arg] [--config.x=y ...] \\
      [--steps=10] [--warmup=2] [--json=PATH]

`--steps=0` only compiles: FLOPs, memory and compile time, with nothing
allocated (a model too big for this machine can still be sized).

The measurement (fmjax/train/benchmark.py) builds the experiment's real train
step (`fmjax.train.state.setup` and `fmjax.train.step.make_train_step`, so
every model and objective the config can name is measured the same way),
compiles it, and runs it on a fixed synthetic batch of random tokens packed
like training data (about 4 documents per row, so attention masks segments).
It reports, as a readable table on stderr and one JSON object on stdout:

- compile time: lowering and XLA compilation, timed separately;
- step time: the median over `--steps` timed steps after `--warmup` steps,
  each the wall time between the completions of successive steps, with at most
  two steps in flight (more can deadlock XLA:CPU's fake devices);
- tokens/s: tokens per step (batch x seq_len) / step time;
- model FLOPs per token (fmjax.nn.cost.flops_per_token) and
  MFU = tokens/s x FLOPs per token / peak FLOP/s of all devices in use. GPUs
  and TPUs use their datasheet's dense bf16 peak; a CPU has none, so the peak
  is measured in this run: the best of large jitted matmuls in the compute
  dtype, before and after the timed steps. The headline figures
  (`flops_per_token`, `mfu`) count causal attention: each query against
  itself and the keys before it, (T + 1) / 2 on average, about half the
  T x T square, which is the work a kernel that skips the masked half does.
  `flops_per_token_full_square` and `mfu_full_square` count the whole square,
  as XLA's dot products compute it; `xla_flops_per_token`, XLA's own count of
  the compiled step, is comparable with `flops_per_token_full_square`;
- memory per device from the compiled step's memory analysis, and the bytes
  of parameters plus optimizer state each device holds under the config's
  shardings;
- the parameter count.

Host data loading is not part of the measurement: the batch is made once.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from fmjax import errors
from fmjax.runtime import cli

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps; 0 only compiles (FLOPs, memory).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing starts.")
_JSON = flags.DEFINE_string("json", None, "Also write the JSON record to this file.")


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  argv = list(sys.argv if argv is None else argv)
  cfg = cli.parse_config(argv, __doc__)
  if _STEPS.value < 0 or _WARMUP.value < 0:
    raise cli.UsageError(f"--steps={_STEPS.value} and --warmup={_WARMUP.value} must be >= 0 "
                         "(--steps=0 only compiles)")
  if _JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_JSON.value))):
    raise cli.UsageError(f"--json={_JSON.value}: its directory does not exist")
  # Imported only now, after host_malloc.reexec has restarted the process: they load jax.
  from fmjax import validate
  from fmjax.train import benchmark

  cfg = validate.resolve(cfg, cli.start_jax(cfg))
  record = benchmark.measure(cfg, steps=_STEPS.value, warmup=_WARMUP.value)
  record["command"] = " ".join(["python -m fmjax.bench", *argv[1:]])
  print(benchmark.table(record), file=sys.stderr)
  text = json.dumps(record, sort_keys=True)
  print(text)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(text + "\n")
  return errors.OK


if __name__ == "__main__":
  from fmjax.runtime import host_malloc
  host_malloc.reexec()
  sys.exit(main())
