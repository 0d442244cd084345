"""The dropless grouped SwiGLUs (ragged_dot, blocked, gmm) against a loop over groups."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from test_model import init_params, random_batch
from test_moe import ROUTERS, assert_close, layer_inputs, moe_config, reference_layer, run_layer
from fmjax import config as config_lib
from fmjax.nn import block, dispatch, model, moe
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

HOWS = ["ragged_dot", "blocked", "gmm"]
# Uneven groups, empty ones first and in the middle, crossing 128-row tiles; 300
# rows, the last 10 past the groups. Widths not multiples of 128.
SIZES_L = np.array([0, 70, 121, 1, 0, 90, 8], np.int32)
R, D, F = 300, 32, 48
G = len(SIZES_L)
USED = int(SIZES_L.sum())


@functools.lru_cache(maxsize=None)
def inputs():
  rng = np.random.default_rng(0)
  normal = lambda *s, scale=1.0: jnp.asarray(scale * rng.normal(size=s), jnp.float32)
  x_RD = normal(R, D)
  weights = (normal(G, D, F, scale=0.2), normal(G, D, F, scale=0.2), normal(G, F, D, scale=0.2))
  return x_RD, weights, normal(R, D)  # the last: the output's cotangent


def value_and_grads(fn):
  """(y, gradients of sum(y * r_RD) w.r.t. x and the three weights), jitted."""
  def loss(x_RD, wg, wu, wd, r_RD):
    y_RD = fn(x_RD, jnp.asarray(SIZES_L), wg, wu, wd)
    return jnp.sum(y_RD * r_RD), y_RD
  grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  return jax.jit(lambda x, w, r: grad(x, *w, r)[::-1])


def reference_swiglu(x_RD, sizes_L, wg, wu, wd):
  """One group at a time, rows past the groups left at zero."""
  y_RD = jnp.zeros_like(x_RD)
  start = 0
  for g, n in enumerate(np.asarray(sizes_L)):
    rows = x_RD[start:start + n]
    h = jax.nn.silu(jnp.dot(rows, wg[g], precision="highest")) * jnp.dot(rows, wu[g],
                                                                        precision="highest")
    y_RD = y_RD.at[start:start + n].set(jnp.dot(h, wd[g], precision="highest"))
    start += n
  return y_RD


def reference_swiglu_sizes(x_RD, sizes_L, *weights):
  del sizes_L  # static: the reference loops over the concrete sizes
  return reference_swiglu(x_RD, SIZES_L, *weights)


@functools.lru_cache(maxsize=None)
def reference():
  x_RD, weights, r_RD = inputs()
  return jax.device_get(value_and_grads(reference_swiglu_sizes)(x_RD, weights, r_RD))


@pytest.mark.parametrize("how", HOWS)
def test_grouped_swiglu_and_its_gradients_equal_a_loop_over_groups(how):
  x_RD, weights, r_RD = inputs()
  y_ref, grads_ref = reference()
  fn = functools.partial(dispatch.grouped_swiglu, how=how)
  y, grads = jax.device_get(value_and_grads(fn)(x_RD, weights, r_RD))
  assert np.abs(y_ref[:USED]).mean() > 0.1  # the reference is not trivially zero
  np.testing.assert_allclose(y[:USED], y_ref[:USED], rtol=1e-5, atol=1e-5)
  for g, g_ref, name in zip(grads, grads_ref, ["x", "w_gate", "w_up", "w_down"]):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=name)
  # Rows past the groups: exactly zero out, and no gradient into them though r is not zero.
  np.testing.assert_array_equal(y[USED:], 0.0)
  np.testing.assert_array_equal(grads[0][USED:], 0.0)
  # The empty groups' weights get exactly zero gradient.
  for g in grads[1:]:
    np.testing.assert_array_equal(g[SIZES_L == 0], 0.0)


def test_auto_is_blocked_on_cpus_and_gmm_on_tpus(monkeypatch):
  assert jax.default_backend() == "cpu"
  assert [dispatch.resolve_grouped_matmul("auto", b) for b in ("cpu", "gpu", "tpu")] == [
      "blocked", "blocked", "gmm"]
  assert dispatch.resolve_grouped_matmul("ragged_dot", "tpu") == "ragged_dot"
  called = []
  monkeypatch.setattr(dispatch, "GROUPED_SWIGLU", {
      how: (lambda *args, how=how: called.append(how)) for how in HOWS})
  dispatch.grouped_swiglu(*inputs()[:1], jnp.asarray(SIZES_L), *inputs()[1], "auto")
  assert called == ["blocked"]
  # Every choice but auto has a backend list, and auto picks only where a choice runs.
  choices = set(config_lib.CHOICES["model.moe.grouped_matmul"]) - {"auto"}
  assert set(dispatch.GROUPED_MATMUL_BACKENDS) == choices
  for backend, how in dispatch.AUTO_GROUPED_MATMUL.items():
    assert backend in dispatch.GROUPED_MATMUL_BACKENDS[how]


def test_gmm_tiles_divide_the_padded_widths():
  # Real widths: no padding, 512-wide K and N tiles; rows per group set the row tile.
  assert dispatch.gmm_tiling(8192, 16, 1536, 1024) == (256, 512, 512)
  assert dispatch.gmm_tiling(4096, 8, 1536, 768) == (256, 256, 256)
  assert dispatch.gmm_tiling(300, 7, 128, 128) == (128, 128, 128)
  assert dispatch.gmm_tiling(1 << 16, 4, 2048, 2048) == (512, 512, 512)


def test_dropless_model_with_gmm_equals_blocked():
  def run(how):
    cfg = tiny_config(n_layers=1, d_model=32, moe=dict(
        n_routed_experts=8, experts_per_token=2, n_shared_experts=0, moe_intermediate_size=48,
        dispatch="dropless", grouped_matmul=how))
    cfg.data.seq_len, cfg.train.batch_size = 16, 2
    params = random_params(lambda: init_params(cfg), 0.2)
    b = random_batch(cfg)
    spec = ModelSpec.from_config(cfg)
    r = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, cfg.model.vocab_size)),
                    jnp.float32)
    loss = lambda p: jnp.sum(
        model.forward(p, b["tokens"], b["segment_ids"], b["positions"], spec) * r)
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))

  (loss_gmm, grads_gmm), (loss_blocked, grads_blocked) = run("gmm"), run("blocked")
  np.testing.assert_allclose(loss_gmm, loss_blocked, rtol=1e-5)
  assert np.abs(grads_blocked["moe_layers"]["w_down"]).max() > 0
  assert_close(grads_gmm, grads_blocked, rtol=1e-4, atol=1e-6)


def random_params(init, scale, seed=0):
  """Normal values of scale `scale` in the shapes `init` returns, without running it."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype),
                      jax.eval_shape(init))


def test_expert_parallel_dropless_with_gmm_equals_one_expert_at_a_time():
  # Tokens over expert and fsdp, weights gathered over fsdp, partial sums over tensor:
  # shard_map runs the gmm path without its varying-axes check, so check its gradients.
  cfg = moe_config(dispatch="dropless", grouped_matmul="gmm", **ROUTERS["sigmoid_grouped_aux_free"])
  decls = block.restack(moe.decls(cfg.model), 1)
  params = random_params(lambda: params_lib.init(decls, jax.random.key(0)), 0.1)
  x, r = layer_inputs(cfg)
  y_ref, gp_ref, gx_ref = reference_layer(cfg, params, x, r)
  y, dropped, gp, gx = run_layer(cfg, dict(expert=2, fsdp=2, tensor=2), params, decls, x, r)
  assert dropped == 0
  assert_close(y, y_ref)
  assert_close(gx, gx_ref)
  assert_close(gp, gp_ref)
