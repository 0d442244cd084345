"""Times the dropless grouped SwiGLUs: `jax.lax.ragged_dot`, the blocked form and megablox gmm.

  python tools/bench_grouped_matmul.py [--rows=1024] [--width=192] [--expert_width=128] \
      [--experts=8] [--repeats=7]

Forward and backward (all four gradients) of one grouped SwiGLU on one
device, rows assigned to experts at random, next to the batched matmul of
capacity dispatch at factor 1.25 over the same rows. gmm is timed only on
the backends `dispatch.GROUPED_MATMUL_BACKENDS` lists for it; on CPUs that is
the Pallas interpreter, which measures the interpreter, not the kernel.
Prints the median and best of `--repeats` runs of each, interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=1024)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--expert_width", type=int, default=128)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--repeats", type=int, default=7)
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fmjax.nn import dispatch

  rng = np.random.default_rng(0)
  R, D, F, G = a.rows, a.width, a.expert_width, a.experts
  ws = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((G, D, F), (G, D, F), (G, F, D))]
  sizes = jnp.asarray(np.bincount(rng.integers(0, G, R), minlength=G), jnp.int32)
  x = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
  x_cap = jnp.asarray(rng.normal(size=(G, dispatch.capacity(R, G, 1.25), D)), jnp.float32)
  grad = lambda f: jax.jit(jax.value_and_grad(lambda x, *w: jnp.sum(f(x, *w)**2), argnums=(0, 1, 2, 3)))
  fns = {
      "ragged_dot": (grad(lambda x, *w: dispatch.ragged_swiglu(x, sizes, *w)), x),
      "blocked": (grad(lambda x, *w: dispatch.blocked_swiglu(x, sizes, *w)), x),
      "capacity 1.25": (grad(dispatch.swiglu_batched), x_cap),
  }
  if jax.default_backend() in dispatch.GROUPED_MATMUL_BACKENDS["gmm"]:
    fns["gmm"] = (grad(lambda x, *w: dispatch.gmm_swiglu(x, sizes, *w)), x)
  for f, inputs in fns.values():
    jax.block_until_ready(f(inputs, *ws))
  times = {k: [] for k in fns}
  for _ in range(a.repeats):
    for k, (f, inputs) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(inputs, *ws))
      times[k].append(time.perf_counter() - start)
  print(f"{R} rows of width {D}, {G} experts of width {F}, forward + backward, "
        f"{jax.devices()[0].platform}")
  for k, t in times.items():
    print(f"{k:<14} median {np.median(t) * 1e3:8.1f} ms   best {min(t) * 1e3:8.1f} ms")
  return 0


if __name__ == "__main__":
  sys.exit(main())
