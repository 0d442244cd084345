"""Attention kernels against a naive reference, forward and backward, on packed rows.

The Pallas kernels (GPU flash attention and TPU splash attention) run
interpreted on the CPU; cuDNN cannot run here, so its call is checked with
jax's XLA implementation in place of the cuDNN one, and its selection logic
on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax import config as config_lib
from fmjax.errors import ConfigError
from fmjax.nn import attention, model, sharding
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec
from fmjax.train import objectives
from fmjax.validate import validate
from test_model import random_batch

MLA = dict(attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12)
MOE = dict(MLA, moe=dict(n_routed_experts=4, experts_per_token=2, moe_intermediate_size=32,
                         dispatch="dropless"))
# Gemma 2's layer: windowed and full layers in one scan, soft-capped scores and logits;
# Gemma 3's: per-head q/k norms, the windowed layers' own rotary theta, no caps.
GEMMA = dict(n_layers=4, sliding_window=5, full_attention_every=2, post_norms=True,
             norm_offset=1.0, scale_embeddings=True, mlp_activation="gelu_tanh")
GEMMA2 = dict(GEMMA, attn_softcap=1.5, logit_softcap=5.0, query_scale_dim=24)
GEMMA3 = dict(GEMMA, qk_norm=True, local_rope_theta=100.0)


def naive(q_BTNH, k_BTKH, v_BTKG, seg_BT, scale, window=0, softcap=0.0):
  """Attention in float64 numpy: each query sees its own document's keys at or before it
  (and with `window` > 0, fewer than `window` positions before it); with `softcap`, each
  score s becomes softcap * tanh(s / softcap)."""
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q_BTNH, k_BTKH, v_BTKG, seg_BT))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  T = q.shape[1]
  visible = (seg[:, :, None] == seg[:, None, :]) & np.tri(T, dtype=bool)[None]
  if window:
    t = np.arange(T)
    visible &= (t[:, None] - t[None, :] < window)[None]
  s = np.einsum("bqnh,bknh->bnqk", q, k) * scale
  if softcap:
    s = softcap * np.tanh(s / softcap)
  s = np.where(visible[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", p, v)


def reference(q_BTNH, k_BTKH, v_BTKG, seg_BT, scale):
  """The same in jnp, written out, to differentiate."""
  rep = q_BTNH.shape[2] // k_BTKH.shape[2]
  k, v = jnp.repeat(k_BTKH, rep, axis=2), jnp.repeat(v_BTKG, rep, axis=2)
  T = q_BTNH.shape[1]
  visible = (seg_BT[:, :, None] == seg_BT[:, None, :]) & jnp.tri(T, dtype=bool)[None]
  s = jnp.einsum("bqnh,bknh->bnqk", q_BTNH, k) * scale
  p = jax.nn.softmax(jnp.where(visible[:, None], s, -jnp.inf), axis=-1)
  return jnp.einsum("bnqk,bknh->bqnh", p, v)


def packed_rows(T):
  """Two rows of several documents each; the second ends in padding (segment 0)."""
  a = [1] * 7 + [2] * 15 + [3] * (T - 22)
  b = [1] * 3 + [2] * 4 + [3] * (T - 7 - 5) + [0] * 5
  return jnp.asarray(np.array([a, b], np.int32))


SHAPES = {  # (N, K, H, G): query heads, key/value heads, query/key dim, value dim
    "gqa": (4, 2, 16, 16),
    "mla": (4, 4, 24, 12),
}


def qkv(shape, T, seed=0, dtype=jnp.float32):
  N, K, H, G = SHAPES[shape]
  r = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(r[0], (2, T, N, H), dtype), jax.random.normal(r[1], (2, T, K, H), dtype),
          jax.random.normal(r[2], (2, T, K, G), dtype))


def spec_for(impl, **model_fields):
  cfg = tiny_config(attention_impl=impl, **model_fields)
  return ModelSpec.from_config(cfg)


def use_xla_for_cudnn(monkeypatch):
  """Runs what fmjax passes to cuDNN through jax's XLA implementation instead."""
  dpa = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: dpa(*a, implementation="xla", **kw))
  monkeypatch.setattr(attention, "_impl", lambda spec, q: spec.model.attention_impl)


# T = 40 is not a whole number of kernel blocks, so rows are padded; 128 is.
KERNEL_CASES = [(impl, shape, 40) for impl in ("xla", "cudnn", "pallas", "splash")
                for shape in ("gqa", "mla")] + [("pallas", "gqa", 128), ("splash", "mla", 128)]


@pytest.mark.parametrize("impl, shape, T", KERNEL_CASES)
def test_kernel_equals_naive_forward_and_backward(impl, shape, T, monkeypatch):
  if impl == "cudnn":
    use_xla_for_cudnn(monkeypatch)
  q, k, v = qkv(shape, T)
  seg = packed_rows(T)
  scale = 0.3
  spec = spec_for(impl)
  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, scale, spec))(q, k, v)
  np.testing.assert_allclose(out, naive(q, k, v, seg, scale), rtol=2e-5, atol=2e-5)

  cot = jax.random.normal(jax.random.key(9), out.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)
  got = jax.jit(jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, seg, scale, spec)),
                         argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: reference(q, k, v, seg, scale)), argnums=(0, 1, 2))(q, k, v)
  for g, w, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "cudnn", "splash"])
def test_a_sliding_window_kernel_equals_naive_forward_and_backward(impl, monkeypatch):
  """model.sliding_window=W: a query sees its last W positions (its own included), within
  its document. W=5 is shorter than every document of the rows but the padding."""
  if impl == "cudnn":
    use_xla_for_cudnn(monkeypatch)
  T, W, scale = 40, 5, 0.3
  q, k, v = qkv("gqa", T, seed=2)
  seg = packed_rows(T)
  spec = spec_for(impl, sliding_window=W)
  attend = lambda q, k, v: attention.attend(q, k, v, seg, scale, spec)
  out = jax.jit(attend)(q, k, v)
  np.testing.assert_allclose(out, naive(q, k, v, seg, scale, W), rtol=2e-5, atol=2e-5)
  assert np.abs(out - naive(q, k, v, seg, scale)).max() > 0.1  # the window matters here
  cot = jax.random.normal(jax.random.key(9), out.shape)
  got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cot), argnums=(0, 1, 2)))(
      q, k, v)
  xla_spec = spec_for("xla", sliding_window=W)
  want = jax.grad(lambda q, k, v: jnp.sum(
      attention.attend(q, k, v, seg, scale, xla_spec) * cot), argnums=(0, 1, 2))(q, k, v)
  for g, w, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_soft_capped_scores_equal_naive_forward_and_backward(impl):
  """model.attn_softcap: scores (after the scale) pass through cap * tanh(s / cap); with a
  window too (Gemma 2's windowed layers). The cap bites: without it the output differs."""
  T, W, scale, cap = 40, 7, 0.5, 1.5
  q, k, v = qkv("gqa", T, seed=4)
  seg = packed_rows(T)
  for window in (0, W):
    spec = spec_for(impl, attn_softcap=cap, sliding_window=window)
    attend = lambda q, k, v: attention.attend(q, k, v, seg, scale, spec)
    out = jax.jit(attend)(q, k, v)
    np.testing.assert_allclose(out, naive(q, k, v, seg, scale, window, cap), rtol=2e-5,
                               atol=2e-5)
    assert np.abs(out - naive(q, k, v, seg, scale, window)).max() > 0.1
    cot = jax.random.normal(jax.random.key(9), out.shape)
    got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cot), argnums=(0, 1, 2)))(
        q, k, v)

    def capped(q, k, v):  # the reference, written out, to differentiate
      rep = q.shape[2] // k.shape[2]
      k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
      t = jnp.arange(T)
      visible = (seg[:, :, None] == seg[:, None, :]) & (t[:, None] >= t[None, :])[None]
      if window:
        visible &= (t[:, None] - t[None, :] < window)[None]
      s = cap * jnp.tanh(jnp.einsum("bqnh,bknh->bnqk", q, k) * scale / cap)
      p = jax.nn.softmax(jnp.where(visible[:, None], s, -jnp.inf), axis=-1)
      return jnp.sum(jnp.einsum("bnqk,bknh->bqnh", p, v) * cot)

    want = jax.grad(capped, argnums=(0, 1, 2))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name} window {window}")


def test_a_layer_flag_picks_the_window_inside_a_scan():
  """With full_attention_every, a scanned layer's traced flag picks windowed or full
  attention, in training and in decoding: the same as a static choice."""
  q, k, v = qkv("gqa", 16, seed=6)
  seg = jnp.ones((2, 16), jnp.int32)
  spec = spec_for("xla", sliding_window=3, full_attention_every=2)
  positions = jnp.array([[5, 6], [12, 13]], jnp.int32)

  def both(local):
    return (attention.attend(q, k, v, seg, 0.3, spec, local),
            attention.attend_cached(q[:, :2], k, v, positions, 0.3, spec, local))

  _, traced = jax.lax.scan(lambda c, local: (c, both(local)), 0, jnp.array([True, False]))
  for i, local in enumerate((True, False)):
    for got, want in zip(traced, both(local)):
      np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)
  full, windowed = both(False), both(True)
  np.testing.assert_allclose(full[0], naive(q, k, v, seg, 0.3), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(windowed[0], naive(q, k, v, seg, 0.3, 3), rtol=2e-5, atol=2e-5)
  assert np.abs(full[0] - windowed[0]).max() > 0.1


def test_a_sliding_window_decodes_over_the_last_w_slots():
  """attend_cached with a window: each new query sees slots (t - W, t] of the cache."""
  q, k, v = qkv("gqa", 16, seed=5)
  positions = jnp.array([[3, 4], [11, 12]], jnp.int32)
  spec = spec_for("xla", sliding_window=4)
  out = jax.jit(lambda q, k, v: attention.attend_cached(q, k, v, positions, 0.25, spec))(
      q[:, :2], k, v)
  for b in range(2):
    for i in range(2):
      t = int(positions[b, i])
      lo = max(0, t - 3)
      one = naive(q[b:b + 1, i:i + 1], k[b:b + 1, lo:t + 1], v[b:b + 1, lo:t + 1],
                  np.ones((1, 1)), 0.25)  # one query against exactly its window
      np.testing.assert_allclose(out[b, i], one[0, 0], rtol=2e-5, atol=2e-5)


def test_cudnn_decoding_call_equals_the_masked_reference(monkeypatch):
  """One new token per row against a cache: cuDNN's padding mask over slots <= position."""
  use_xla_for_cudnn(monkeypatch)
  q, k, v = qkv("mla", 16, seed=3)
  q = q[:, :1]
  positions = jnp.array([[4], [11]], jnp.int32)
  spec = spec_for("cudnn", dtype="bfloat16")
  cast = lambda x: x.astype(jnp.bfloat16)
  out = attention.attend_cached(cast(q), cast(k), cast(v), positions, 0.25, spec)
  want = attention.xla(q, k, v, attention.cache_mask(positions, 16), 0.25)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=3e-2, atol=3e-2)
  assert out.shape == (2, 1, 4, 12)


def test_auto_picks_per_backend_and_falls_back_where_cudnn_cannot_run():
  assert attention.resolve("auto", "cpu", "float32", 64) == "xla"
  assert attention.resolve("auto", "gpu", "bfloat16", 128) == "cudnn"
  assert attention.resolve("auto", "gpu", "bfloat16", 192) == "cudnn"  # MLA: 128 + 64
  assert attention.resolve("auto", "gpu", "float32", 128) == "pallas"  # cuDNN: 16-bit only
  assert attention.resolve("auto", "gpu", "bfloat16", 576) == "pallas"  # past cuDNN's 256
  assert attention.resolve("auto", "tpu", "bfloat16", 128) == "splash"
  assert attention.resolve("pallas", "gpu", "bfloat16", 128) == "pallas"
  assert attention.resolve("auto", "gpu", "float32", 128, window=8) == "xla"  # no pallas window
  assert attention.resolve("auto", "gpu", "bfloat16", 128, softcap=50.0) == "xla"  # Gemma 2
  assert attention.resolve("auto", "tpu", "bfloat16", 128, softcap=50.0) == "splash"


@pytest.mark.parametrize("impl, fields, words", [
    ("cudnn", {}, ["model.attention_impl='cudnn'", "cpu backend", "runs on: gpu", "auto or xla"]),
    ("pallas", dict(sliding_window=8), ["model.attention_impl='pallas'", "has no sliding window",
                                        "model.sliding_window=8", "use cudnn or xla"]),
    ("cudnn", dict(attn_softcap=50.0), ["model.attention_impl='cudnn'", "no attention soft-capping",
                                        "model.attn_softcap=50.0", "use xla or splash"]),
    ("xla", dict(full_attention_every=2), ["model.full_attention_every=2",
                                           "model.sliding_window=0"]),
    ("xla", dict(local_rope_theta=10.0), ["model.local_rope_theta=10.0", "set a window"]),
    ("xla", dict(mlp_activation="gelu_tanh", moe=dict(n_routed_experts=4)),
     ["model.mlp_activation='gelu_tanh' with experts", "SwiGLU only", "use 'silu'"]),
])
def test_a_kernel_the_backend_lacks_is_a_one_line_config_error(impl, fields, words):
  cfg = tiny_config(attention_impl=impl, **fields)
  with pytest.raises(ConfigError) as e:
    validate(cfg, n_devices=8)
  msg = str(e.value)
  assert "\n" not in msg
  for w in words:
    assert w in msg, msg


def test_a_grouped_matmul_the_backend_lacks_is_a_one_line_config_error(monkeypatch):
  cfg = tiny_config(moe=dict(n_routed_experts=4, dispatch="dropless", grouped_matmul="gmm"))
  validate(cfg, n_devices=8)  # interpreted on CPUs
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ConfigError, match=r"^model.moe.grouped_matmul='gmm' is not available on "
                     r"the gpu backend \(it runs on: tpu, cpu\); use auto, blocked or ragged_dot$"):
    validate(cfg, n_devices=8)


def test_availability_by_backend_dtype_and_head_dim():
  assert attention.unavailable("xla", "cpu", "float32", 64) is None
  assert attention.unavailable("pallas", "cpu", "float32", 64) is None  # interpreted
  assert attention.unavailable("splash", "gpu", "bfloat16", 64).startswith(
      "is not available on the gpu backend (it runs on: tpu, cpu)")
  assert "model.dtype" in attention.unavailable("cudnn", "gpu", "float32", 64)
  assert "head dim" in attention.unavailable("cudnn", "gpu", "bfloat16", 576)
  assert attention.unavailable("cudnn", "gpu", "bfloat16", 128) is None


def _loss_and_grads(cfg, batch, mesh=None):
  spec = ModelSpec.from_config(cfg)
  decls = model.param_decls(cfg.model)
  params = params_lib.init(decls, jax.random.key(0))
  objective = objectives.OBJECTIVES["next_token"]
  fn = jax.value_and_grad(lambda p, b: objective(p, b, spec, cfg.objective)[0])
  if mesh is None:
    return jax.device_get(jax.jit(fn)(params, batch))
  param_sh = params_lib.shardings(decls, mesh, cfg.sharding.params)
  batch_sh = sharding.batch_sharding(mesh, cfg.sharding.activations)
  with jax.set_mesh(mesh):
    return jax.device_get(jax.jit(fn, in_shardings=(param_sh, batch_sh))(
        jax.device_put(params, param_sh), jax.device_put(batch, batch_sh)))


@pytest.fixture(scope="module")
def xla_runs():
  """The XLA reference's loss and gradients for each model shape (computed once)."""
  out = {}
  for shape, fields in (("gqa", {}), ("mla", MLA), ("moe", MOE), ("gemma2", GEMMA2),
                        ("gemma3", GEMMA3)):
    cfg = tiny_config(**fields)
    batch = random_batch(cfg, docs_per_row=3)
    out[shape] = (fields, batch, _loss_and_grads(cfg, batch))
  return out


MESH = dict(data=2, fsdp=2, tensor=2)
EXPERT_MESH = dict(data=2, expert=2, tensor=2)


@pytest.mark.parametrize("impl, shape, mesh_shape", [
    ("pallas", "gqa", None), ("splash", "mla", None), ("pallas", "mla", MESH),
    ("splash", "gqa", MESH), ("pallas", "moe", EXPERT_MESH), ("splash", "gemma2", MESH),
    ("cudnn", "gemma3", MESH)],
    ids=["pallas-gqa", "splash-mla", "pallas-mla-mesh", "splash-gqa-mesh", "pallas-moe-expert-mesh",
         "splash-gemma2-mesh", "cudnn-gemma3-mesh"])
def test_model_loss_and_gradients_equal_xla(impl, shape, mesh_shape, xla_runs, monkeypatch):
  """A whole model's loss and gradients with a kernel equal the XLA path's, on one
  device and with batch and heads split over a mesh of 8. (Gemma: a kernel per layer
  kind, picked inside the scan by the layer's flag.)"""
  if impl == "cudnn":
    use_xla_for_cudnn(monkeypatch)
  fields, batch, (loss_ref, grads_ref) = xla_runs[shape]
  cfg = tiny_config(attention_impl=impl, **fields)
  mesh = None
  if mesh_shape:
    cfg.mesh.update(mesh_shape)
    if "expert" in mesh_shape:  # tokens are split over the expert axis too
      cfg.sharding.activations.batch = "data,fsdp,expert"
    mesh = sharding.make_mesh(cfg.mesh)
  loss, grads = _loss_and_grads(cfg, batch, mesh)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  # Gemma's gradients are about 10x larger (embeddings x sqrt(d_model)): the same rounding
  atol = 2e-5 if shape.startswith("gemma") else 2e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=atol), grads,
               grads_ref)


def test_attention_impl_is_a_schema_choice():
  assert config_lib.CHOICES["model.attention_impl"] == ("auto", "xla", "cudnn", "pallas", "splash")
  assert set(attention.BACKENDS) == set(attention.IMPLS)
  assert set(attention.IMPLS) | {"auto"} == set(config_lib.CHOICES["model.attention_impl"])


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                            reason="needs a GPU: JAX_PLATFORMS=cuda pytest -k on_gpu")


@on_gpu
@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_on_gpu_kernel_equals_reference_in_bf16(impl, shape):
  """The real kernels (not interpreted) on packed rows, forward and backward, in bf16."""
  T, scale = 256, 0.2
  q, k, v = qkv(shape, T, seed=4)
  seg = packed_rows(T)
  spec = spec_for(impl, dtype="bfloat16")
  bf = lambda x: x.astype(jnp.bfloat16)
  f32 = lambda x: np.asarray(x, np.float32)
  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, scale, spec))(bf(q), bf(k), bf(v))
  want = naive(f32(bf(q)), f32(bf(k)), f32(bf(v)), seg, scale)
  np.testing.assert_allclose(f32(out), want, rtol=0, atol=3e-2)
  cot = jax.random.normal(jax.random.key(9), out.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
  got = jax.jit(jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, seg, scale, spec)),
                         argnums=(0, 1, 2)))(bf(q), bf(k), bf(v))
  ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, seg, scale)), argnums=(0, 1, 2))(
      *(bf(x).astype(jnp.float32) for x in (q, k, v)))
  for g, w, name in zip(got, ref, "qkv"):
    err = np.abs(f32(g) - f32(w)).max() / np.abs(f32(w)).max()
    assert err < 3e-2, f"d{name}: relative error {err:.3g}"


@on_gpu
def test_on_gpu_cudnn_with_a_sliding_window_equals_reference_in_bf16():
  T, W, scale = 256, 24, 0.2
  q, k, v = qkv("gqa", T, seed=4)
  seg = packed_rows(T)
  bf = lambda x: x.astype(jnp.bfloat16)
  f32 = lambda x: np.asarray(x, np.float32)
  out = jax.jit(lambda q, k, v: attention.attend(
      q, k, v, seg, scale, spec_for("cudnn", dtype="bfloat16", sliding_window=W)))(
          bf(q), bf(k), bf(v))
  want = naive(f32(bf(q)), f32(bf(k)), f32(bf(v)), seg, scale, W)
  np.testing.assert_allclose(f32(out), want, rtol=0, atol=3e-2)


@on_gpu
def test_on_gpu_auto_is_cudnn_for_a_bf16_model():
  assert attention._impl(spec_for("auto", dtype="bfloat16"), jnp.zeros((1, 8, 4, 64),
                                                                      jnp.bfloat16)) == "cudnn"
