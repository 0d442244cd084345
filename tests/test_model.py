"""The dense decoder against independent references, on one and many devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.nn import cost, model, rope
from fmjax.train import objectives, state as state_lib, step as step_lib
from fmjax.runtime import distributed
from fmjax.nn import params as params_lib
from fmjax.nn import sharding
from fmjax.nn.spec import ModelSpec


def random_batch(cfg, seed=0, docs_per_row=1):
  rng = np.random.default_rng(seed)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(1, cfg.model.vocab_size, (B, T)).astype(np.int32)
  bounds = np.linspace(0, T, docs_per_row + 1).astype(int)
  seg = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    seg[:, a:b] = i + 1
    pos[:, a:b] = np.arange(b - a)
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def run_one_step(cfg, mesh_shape, batch):
  """(metrics, grads, new params) of one train step on a mesh of that shape."""
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(mesh_shape)
  n = int(np.prod(list(mesh_shape.values())))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
  s = state_lib.setup(cfg, mesh)
  state = state_lib.init_state(s, seed=0)
  objective = objectives.OBJECTIVES[cfg.objective.name]
  grad_fn = jax.jit(jax.grad(lambda p, b: objective(p, b, ModelSpec.from_config(cfg), cfg.objective)[0]),
                    in_shardings=(s.state_shardings["params"], s.batch_sharding))
  with jax.set_mesh(mesh):
    gb = distributed.global_batch(batch, s.batch_sharding)
    grads = jax.device_get(grad_fn(state["params"], gb))
    state, metrics = step_lib.make_train_step(s)(state, gb)
  return jax.device_get(metrics), grads, jax.device_get(state["params"])


MESHES = [dict(data=2, fsdp=2, tensor=2), dict(data=8, fsdp=1, tensor=1),
          dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=4, tensor=2)]


@pytest.fixture(scope="module")
def single_device_step():
  cfg = tiny_config()
  batch = random_batch(cfg, docs_per_row=2)
  return cfg, batch, run_one_step(cfg, dict(data=1, fsdp=1, tensor=1), batch)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m.values())))
def test_sharded_step_equals_single_device(single_device_step, mesh_shape):
  cfg, batch, (m1, g1, p1) = single_device_step
  m8, g8, p8 = run_one_step(cfg, mesh_shape, batch)
  np.testing.assert_allclose(m8["nll"], m1["nll"], rtol=1e-5)
  assert m8["tokens"] == m1["tokens"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)
  # Adam's first update is about lr * sign(g): where g is ~0, rounding may flip it.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.1 * cfg.optimizer.lr), p8, p1)


def test_microbatches_equal_one_batch(single_device_step):
  cfg, batch, (m1, g1, p1) = single_device_step
  cfg = cfg.copy_and_resolve_references()
  cfg.train.microbatches = 2
  m2, _, p2 = run_one_step(cfg, dict(data=2, fsdp=2, tensor=2), batch)
  np.testing.assert_allclose(m2["nll"], m1["nll"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.1 * cfg.optimizer.lr), p2, p1)


def init_params(cfg, seed=0):
  return params_lib.init(model.param_decls(cfg.model), jax.random.key(seed))


def test_causal_and_documents_do_not_leak():
  cfg = tiny_config()
  batch = random_batch(cfg, docs_per_row=2)
  params = init_params(cfg)
  fwd = jax.jit(lambda toks: model.forward(params, toks, batch["segment_ids"],
                                           batch["positions"], ModelSpec.from_config(cfg)))
  base = np.asarray(fwd(batch["tokens"]))
  T, t = cfg.data.seq_len, 5
  later = batch["tokens"].copy()
  later[:, t + 1:] = (later[:, t + 1:] + 7) % cfg.model.vocab_size
  changed = np.asarray(fwd(later))
  np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])
  assert np.abs(changed[:, t + 1:] - base[:, t + 1:]).max() > 1e-3
  # Changing the first document leaves the second (positions T/2..T) unchanged.
  first = batch["tokens"].copy()
  first[:, :T // 2] = (first[:, :T // 2] + 3) % cfg.model.vocab_size
  np.testing.assert_allclose(np.asarray(fwd(first))[:, T // 2:], base[:, T // 2:], atol=1e-6)


def test_gradient_wrt_future_inputs_is_zero():
  cfg = tiny_config()
  batch = random_batch(cfg)
  params = init_params(cfg)
  spec = ModelSpec.from_config(cfg)
  embed = model.embed(params, batch["tokens"], spec)
  t = 10

  def logit_at_t(x_BTD):
    h = model.decode(params, x_BTD, batch["segment_ids"], batch["positions"], spec)
    return model.unembed(params, h, spec)[:, t].sum()

  g = jax.grad(logit_at_t)(embed)
  assert np.abs(np.asarray(g[:, t + 1:])).max() == 0.0
  assert np.abs(np.asarray(g[:, :t + 1])).max() > 0.0


def test_rope_is_relative():
  """q.k after RoPE depends only on the distance between positions."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)

  inv_freq = rope.inv_frequencies(16, 10000.0, tiny_config().model.rope_scaling)

  def score(pq, pk):
    cq, sq = rope.angles(jnp.array([[pq]]), inv_freq)
    ck, sk = rope.angles(jnp.array([[pk]]), inv_freq)
    return float(jnp.sum(rope.apply(q, cq, sq) * rope.apply(k, ck, sk)))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_overfits_a_fixed_batch():
  cfg = tiny_config()
  cfg.optimizer.update(lr=1e-2, schedule="constant", weight_decay=0.0)
  cfg.train.steps = 60
  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  state = state_lib.init_state(s, seed=0)
  step = step_lib.make_train_step(s)
  batch = random_batch(cfg)
  with jax.set_mesh(mesh):
    gb = distributed.global_batch(batch, s.batch_sharding)
    first = None
    for _ in range(cfg.train.steps):
      state, m = step(state, gb)
      # Fetching each step keeps few executions in flight, as the train loop
      # does: XLA:CPU collectives can deadlock with many queued on fake devices.
      loss = float(m["nll"] / m["tokens"])
      first = loss if first is None else first
  assert first > 5.5  # ln(512) = 6.24 at init
  assert loss < 0.5


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_formula_matches_tree(tie):
  cfg = tiny_config(tie_embeddings=tie, n_kv_heads=1, head_dim=24)
  tree = jax.eval_shape(lambda: init_params(cfg))
  real = sum(x.size for x in jax.tree.leaves(tree))
  assert cost.param_counts(cfg.model)["total"] == real
  embed = cfg.model.vocab_size * cfg.model.d_model * (1 if tie else 2)
  assert cost.param_counts(cfg.model)["non_embedding"] == real - embed


def xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis["flops"])


def test_flops_formula_matches_xla_cost_analysis():
  # Wide enough that matmuls dominate, unscanned so XLA counts every layer.
  cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=512,
                    scan_layers=False)
  assert_flops_formula_matches_xla(cfg)


def assert_flops_formula_matches_xla(cfg, seq_len=128, batch_size=2):
  """The forward and gradient FLOPs formulas within 5% of XLA's cost analysis."""
  cfg.data.seq_len = seq_len
  cfg.train.batch_size = batch_size
  params = jax.eval_shape(lambda: init_params(cfg))
  batch = jax.tree.map(jnp.asarray, random_batch(cfg))
  tokens = batch_size * seq_len
  objective = objectives.OBJECTIVES["next_token"]
  fwd = xla_flops(lambda p, b: objective(p, b, ModelSpec.from_config(cfg), cfg.objective)[0], params, batch) / tokens
  assert fwd == pytest.approx(cost.flops_per_token(cfg.model, seq_len, training=False), rel=0.05)
  grad = xla_flops(jax.grad(lambda p, b: objective(p, b, ModelSpec.from_config(cfg), cfg.objective)[0]), params, batch) / tokens
  assert grad == pytest.approx(cost.flops_per_token(cfg.model, seq_len), rel=0.05)


def test_flops_formula_matches_the_compiled_train_step():
  """The whole step (forward, backward, clipping, AdamW) against 3x the forward formula."""
  cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=512,
                    scan_layers=False)
  cfg.data.seq_len = 128
  cfg.train.batch_size = 4
  cfg.mesh.update(data=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  s = state_lib.setup(cfg, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding)
           for k, v in random_batch(cfg).items()}
  with jax.set_mesh(mesh):
    compiled = step_lib.make_train_step(s).lower(s.abstract_state, batch).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  per_token = float(analysis["flops"]) / (cfg.train.batch_size * cfg.data.seq_len)
  assert per_token == pytest.approx(cost.flops_per_token(cfg.model, 128), rel=0.05)


def _loss_and_grads(cfg, batch):
  params = init_params(cfg)
  objective = objectives.OBJECTIVES["next_token"]
  (loss, stats), grads = jax.jit(jax.value_and_grad(
      lambda p: objective(p, jax.tree.map(jnp.asarray, batch), ModelSpec.from_config(cfg), cfg.objective), has_aux=True))(params)
  return float(loss / stats["tokens"]), grads


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_do_not_change_gradients(remat):
  base = tiny_config()
  batch = random_batch(base, docs_per_row=2)
  loss0, g0 = _loss_and_grads(base, batch)
  loss1, g1 = _loss_and_grads(tiny_config(remat=remat), batch)
  assert loss1 == pytest.approx(loss0, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


def test_bfloat16_compute_tracks_float32():
  base = tiny_config()
  batch = random_batch(base)
  loss32, _ = _loss_and_grads(base, batch)
  loss16, g16 = _loss_and_grads(tiny_config(dtype="bfloat16"), batch)
  assert loss16 == pytest.approx(loss32, rel=0.02)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # float32 master weights
