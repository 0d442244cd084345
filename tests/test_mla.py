"""Multi-head latent attention and RoPE scaling against independent references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax import config as config_lib
from fmjax.nn import cost, mla, model, rope, sharding
from fmjax.train import objectives
from fmjax.nn import params as params_lib
from test_model import assert_flops_formula_matches_xla, init_params, random_batch
from fmjax.validate import validate
from fmjax.nn.spec import ModelSpec

MLA = dict(attention="mla", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12)


def yarn_inv_freq(dim, base, factor, original, beta_fast=32, beta_slow=1):
  """YaRN's frequencies as the paper states them: interpolate by factor the dims
  that turn fewer than beta_slow times over the original context, keep those
  that turn more than beta_fast times, and ramp linearly in between."""
  extrapolated = base ** (-np.arange(0, dim, 2) / dim)
  interpolated = extrapolated / factor
  rotations = original * extrapolated / (2 * np.pi)  # turns over the original context

  def dim_of(r):  # the (fractional) index whose frequency turns r times
    return dim * np.log(original / (r * 2 * np.pi)) / (2 * np.log(base))

  low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  assert (ramp[rotations > beta_fast] == 0).all() and (ramp[rotations < beta_slow] == 1).all()
  return interpolated * ramp + extrapolated * (1 - ramp)


def reference_mla(p, x, positions, segments, m):
  """One MLA layer in numpy float64: the latent expanded to full keys and values."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  N, C, R = m.n_heads, m.kv_lora_rank, m.qk_rope_head_dim
  dn, dv = m.qk_nope_head_dim, m.v_head_dim
  B, T, _ = x.shape

  def rms(v, g):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + m.norm_eps) * g

  if m.q_lora_rank:
    q = rms(x @ p["wq_a"], p["q_norm"]) @ p["wq_b"].reshape(m.q_lora_rank, -1)
  else:
    q = x @ p["wq"].reshape(m.d_model, -1)
  q = q.reshape(B, T, N, dn + R)
  kv = x @ p["wkv_a"]
  c, k_pe = rms(kv[..., :C], p["kv_norm"]), kv[..., C:]
  kv_b = (c @ p["wkv_b"].reshape(C, -1)).reshape(B, T, N, dn + dv)
  k_nope, v = kv_b[..., :dn], kv_b[..., dn:]

  s = m.rope_scaling
  if s.kind == "yarn":
    inv_freq = yarn_inv_freq(R, m.rope_theta, s.factor, s.original_seq_len)
    mscale = 0.1 * s.mscale * np.log(s.factor) + 1
  else:
    inv_freq, mscale = m.rope_theta ** (-np.arange(0, R, 2) / R), 1.0
  ang = np.asarray(positions, np.float64)[..., None, None] * inv_freq  # (B, T, 1, R/2)

  def rotate(u):  # rotate-half layout
    u1, u2 = u[..., :R // 2], u[..., R // 2:]
    return np.concatenate([u1 * np.cos(ang) - u2 * np.sin(ang),
                           u2 * np.cos(ang) + u1 * np.sin(ang)], -1)

  q = np.concatenate([q[..., :dn], rotate(q[..., dn:])], -1)
  k_pe = np.broadcast_to(rotate(k_pe[:, :, None]), (B, T, N, R))
  k = np.concatenate([k_nope, k_pe], -1)
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(dn + R) * mscale**2
  seg = np.asarray(segments)
  allowed = np.tril(np.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bknh->bqnh", probs, v)
  return np.einsum("bqnh,nhd->bqd", out, p["wo"])


CASES = {
    "plain_query": dict(MLA, q_lora_rank=0),
    "q_lora_yarn": dict(MLA, rope_scaling=dict(kind="yarn", factor=4.0, original_seq_len=16,
                                               beta_fast=32.0, beta_slow=1.0, mscale=1.0)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_mla_layer_matches_reference(case, absorbed):
  cfg = tiny_config(**CASES[case])
  m = cfg.model
  validate(cfg, n_devices=8)
  params = init_params(cfg, seed=2)
  layer = jax.tree.map(lambda a: a[0], params["layers"])
  for name in ("q_norm", "kv_norm"):  # norm scales away from 1, so a missed norm shows
    if name in layer:
      layer[name] = layer[name] * (1.0 + 0.5 * jnp.sin(jnp.arange(layer[name].shape[0])))
  batch = random_batch(cfg, docs_per_row=2)
  x = 0.5 * jax.random.normal(jax.random.key(1), (2, cfg.data.seq_len, m.d_model))
  pos, seg = batch["positions"][:2], batch["segment_ids"][:2]
  cos, sin = rope.angles(jnp.asarray(pos), rope.inv_frequencies(
      m.qk_rope_head_dim, m.rope_theta, m.rope_scaling))
  out, _ = mla.apply(layer, x, cos, sin, jnp.asarray(seg), ModelSpec.from_config(cfg),
                     absorbed=absorbed)
  expected = reference_mla(layer, x, pos, seg, m)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_param_count_matches_tree(q_lora_rank):
  cfg = tiny_config(**dict(MLA, q_lora_rank=q_lora_rank))
  tree = jax.eval_shape(lambda: init_params(cfg))
  assert cost.param_counts(cfg.model)["total"] == sum(x.size for x in jax.tree.leaves(tree))


def test_mla_flops_formula_matches_xla_cost_analysis():
  cfg = tiny_config(d_model=256, n_heads=4, d_ff=768, vocab_size=512, scan_layers=False,
                    attention="mla", q_lora_rank=128, kv_lora_rank=96, qk_nope_head_dim=48,
                    qk_rope_head_dim=16, v_head_dim=64)
  assert_flops_formula_matches_xla(cfg)


def test_mla_sharded_gradients_equal_single_device():
  """Loss and gradients on a data=2 x fsdp=2 x tensor=2 mesh against one device
  (the optimizer update is mesh-independent once gradients are: test_model checks it)."""
  cfg = tiny_config(**MLA)
  batch = random_batch(cfg, docs_per_row=2)
  objective = objectives.OBJECTIVES["next_token"]
  decls = model.param_decls(cfg.model)
  params = params_lib.init(decls, jax.random.key(0))
  loss_and_grad = lambda p, b: jax.value_and_grad(lambda p: objective(p, b, ModelSpec.from_config(cfg), cfg.objective)[0])(p)
  loss1, g1 = jax.device_get(jax.jit(loss_and_grad)(params, batch))
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  param_sh = params_lib.shardings(decls, mesh, cfg.sharding.params)
  batch_sh = sharding.batch_sharding(mesh, cfg.sharding.activations)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, param_sh)
    assert sharded["layers"]["wkv_b"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "tensor", None)
    loss8, g8 = jax.device_get(jax.jit(loss_and_grad, in_shardings=(param_sh, batch_sh))(
        sharded, jax.device_put(batch, batch_sh)))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)


def test_yarn_frequencies_and_softmax_scale():
  s = tiny_config().model.rope_scaling
  s.update(kind="yarn", factor=8.0, original_seq_len=256)
  np.testing.assert_allclose(rope.inv_frequencies(64, 10000.0, s),
                             yarn_inv_freq(64, 10000.0, 8.0, 256), rtol=1e-6)
  assert rope.softmax_scale_factor(s) == pytest.approx((0.1 * math.log(8) + 1) ** 2)
  s.mscale = 0.0
  assert rope.softmax_scale_factor(s) == 1.0


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_linear_rope_scaling_is_position_interpolation(kind):
  """A model with linear scaling by 2 at positions 2t is the unscaled one at t."""
  base = tiny_config(**(MLA if kind == "mla" else {}))
  scaled = base.copy_and_resolve_references()
  scaled.model.rope_scaling.update(kind="linear", factor=2.0)
  params = init_params(base)
  batch = random_batch(base)
  fwd = lambda c, pos: np.asarray(jax.jit(lambda p: model.forward(
      p, batch["tokens"], batch["segment_ids"], pos, ModelSpec.from_config(c)))(params))
  np.testing.assert_allclose(fwd(scaled, 2 * batch["positions"]), fwd(base, batch["positions"]),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("attention", "sparse", "model.attention='sparse' is not one of gqa, mla"),
    ("kv_lora_rank", 0, "model.kv_lora_rank=0 must be > 0"),
    ("qk_rope_head_dim", 7, "model.qk_rope_head_dim=7 must be even"),
    ("rope_scaling", dict(kind="dynamic"), "model.rope_scaling.kind='dynamic' is not one of"),
    ("rope_scaling", dict(kind="yarn", factor=4.0),
     "model.rope_scaling.original_seq_len=0 must be > 0 for yarn"),
    ("rope_scaling", dict(factor=0.5), "model.rope_scaling.factor=0.5 must be >= 1"),
])
def test_invalid_mla_and_rope_fields(field, value, message):
  cfg = tiny_config(**MLA)
  if isinstance(value, dict):
    cfg.model[field].update(value)
  else:
    cfg.model[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
    validate(cfg, n_devices=8)


def _experiment(name):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_mla_experiment_matches_the_default_in_size_with_a_smaller_cache():
  mla_cfg, gqa_cfg = _experiment("pretrain_mla_tiny"), _experiment("pretrain_tiny")
  validate(mla_cfg, n_devices=8)
  assert mla_cfg.model.attention == "mla"
  mla_n, gqa_n = (cost.param_counts(c.model)["total"] for c in (mla_cfg, gqa_cfg))
  assert abs(mla_n - gqa_n) / gqa_n < 0.01
  assert cost.cache_bytes_per_token(mla_cfg.model) * 2 < cost.cache_bytes_per_token(gqa_cfg.model)
