"""Times MoE dispatch alone: capacity against dropless, with and without expert parallelism.

  python tools/bench_dispatch.py [--config=experiments/moe_vs_dense.py] [--repeats=5] \
      [--skew=0.0]

Forward and backward of `fmjax.nn.dispatch.routed_experts` (the routed experts of
one MoE layer, router excluded) for one global batch of the experiment's
shape, on its mesh and on the same devices as pure data parallelism. Tokens
pick their experts at random; `--skew` > 0 sends that extra share of the
assignments to expert 0 (a router that is not yet balanced). Prints the median
and best of `--repeats` interleaved runs of each variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/moe_vs_dense.py")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skew", type=float, default=0.0)
  a = p.parse_args()

  from bench_variants import load_config
  from fmjax.runtime import xla_flags
  cfg = load_config(a.config)
  xla_flags.apply()

  import jax
  if cfg.mesh.cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cfg.mesh.cpu_devices))
  import jax.numpy as jnp
  import numpy as np

  from fmjax.nn import dispatch, sharding
  from fmjax.nn.spec import ModelSpec

  m = cfg.model
  E, K, D, F = m.moe.n_routed_experts, m.moe.experts_per_token, m.d_model, m.moe.moe_intermediate_size
  B, T = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  scores = rng.random((B, T, E))
  scores[..., 0] += a.skew * E  # expert 0 wins more often
  idx = jnp.asarray(np.argsort(-scores, axis=-1)[..., :K], jnp.int32)
  w = jnp.asarray(rng.random((B, T, K)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  weights = tuple(jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32)
                  for s in ((E, D, F), (E, D, F), (E, F, D)))
  share = float(np.mean(np.asarray(idx) == 0))

  n = jax.device_count()
  layouts = {"ep": dict(cfg.mesh), "dp": dict(cfg.mesh, data=n, fsdp=1, expert=1, tensor=1)}
  fns = {}
  for layout, mesh_fields in layouts.items():
    for kind in ("capacity", "dropless"):
      c = cfg.copy_and_resolve_references()
      c.mesh.update(mesh_fields)
      c.model.moe.update(dispatch=kind, capacity_factor=1.25)
      mesh = sharding.make_mesh(c.mesh)

      def loss(x, *ws, c=c):
        y, dropped = dispatch.routed_experts(x, idx, w, ws, c)
        return jnp.sum(y * y), dropped

      x_sh = sharding.named(mesh, ("batch", "seq", "embed"), c.sharding.activations)
      w_sh = tuple(sharding.named(mesh, axes, c.sharding.params)
                   for axes in (("expert", "embed", "mlp"),) * 2 + (("expert", "mlp", "embed"),))
      with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        args = (jax.device_put(x, x_sh), *(jax.device_put(v, s) for v, s in zip(weights, w_sh)))
        jax.block_until_ready(fn(*args))
      fns[f"{kind} {layout}"] = (fn, args, mesh)

  times = {k: [] for k in fns}
  for _ in range(a.repeats):
    for k, (fn, args, mesh) in fns.items():
      with jax.set_mesh(mesh):
        start = time.perf_counter()
        (_, dropped), _ = jax.block_until_ready(fn(*args))
        times[k].append(time.perf_counter() - start)
  print(f"{B}x{T} tokens of width {D}, {E} experts of width {F}, top-{K}, forward + backward "
        f"on {n} {jax.devices()[0].platform} devices; expert 0 gets {share:.0%} of assignments")
  print(f"ep: mesh {dict(cfg.mesh)}; dp: data={n}")
  base = np.median(times["capacity ep"])
  for k, t in times.items():
    print(f"{k:<14} median {np.median(t) * 1e3:8.1f} ms   best {min(t) * 1e3:8.1f} ms   "
          f"x{np.median(t) / base:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
