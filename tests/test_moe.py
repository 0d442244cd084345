"""Mixture of experts against an independent reference, on one and many devices."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from test_model import assert_flops_formula_matches_xla, init_params, random_batch
from fmjax.validate import validate
from fmjax.nn import block, cost, dispatch, model, moe
from fmjax import config as config_lib
from fmjax.train import loop, metrics
from fmjax.train import objectives, state as state_lib, step as step_lib
from fmjax.runtime import distributed
from fmjax.nn import sharding
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

E, K = 8, 2


def moe_config(**fields):
  """A one-layer MoE model: 8 experts, top-2, a shared expert, tokens sharded over experts."""
  moe_fields = dict(n_routed_experts=E, experts_per_token=K, n_shared_experts=1,
                    moe_intermediate_size=32, balance="aux", aux_loss_coef=0.01)
  moe_fields.update(fields)
  c = tiny_config(n_layers=1, moe=moe_fields)
  c.data.seq_len = 16
  c.sharding.activations.batch = "data,fsdp,expert"
  return c


def reference_moe(p, x_BTD, e, dropped_BTK=None):
  """The MoE block, one expert at a time: top-k by sorting, every expert on every token."""
  logits = x_BTD @ p["router"]
  scores = jax.nn.softmax(logits, -1) if e.score == "softmax" else jax.nn.sigmoid(logits)
  choice = scores + (p["router_bias"] if e.balance == "aux_free" else 0.0)
  if e.n_group > 1:
    B, T, _ = choice.shape
    per_group = choice.reshape(B, T, e.n_group, -1)
    best = jnp.sort(per_group, -1)[..., ::-1]
    group_score = best[..., :2].sum(-1) if e.score == "sigmoid" else best[..., 0]
    rank = jnp.argsort(jnp.argsort(-group_score, -1), -1)  # 0 for the best group
    allowed = jnp.repeat(rank < e.topk_group, per_group.shape[-1], axis=-1)
    choice = jnp.where(allowed, choice, -jnp.inf)
  idx = jnp.argsort(-choice, -1)[..., :e.experts_per_token]
  gates = jnp.take_along_axis(scores, idx, -1)
  if e.norm_topk_prob:
    gates = gates / gates.sum(-1, keepdims=True)
  gates = gates * e.routed_scaling_factor
  if dropped_BTK is not None:
    gates = jnp.where(dropped_BTK, 0.0, gates)
  y = 0.0
  for i in range(e.n_routed_experts):
    gate_BT = jnp.sum(jnp.where(idx == i, gates, 0.0), -1)
    h = jax.nn.silu(x_BTD @ p["w_gate"][i]) * (x_BTD @ p["w_up"][i])
    y = y + gate_BT[..., None] * (h @ p["w_down"][i])
  if "shared_gate" in p:
    y = y + (jax.nn.silu(x_BTD @ p["shared_gate"]) * (x_BTD @ p["shared_up"])) @ p["shared_down"]
  return y, idx


def jitted_init(cfg):
  return jax.jit(lambda: init_params(cfg))()


def layer_params(cfg, seed=0):
  decls = block.restack(moe.decls(cfg.model), 1)
  return decls, params_lib.init(decls, jax.random.key(seed))


def layer_inputs(cfg, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(cfg.train.batch_size, cfg.data.seq_len, cfg.model.d_model))
  r = rng.normal(size=x.shape)
  return jnp.asarray(x, jnp.float32), jnp.asarray(r, jnp.float32)


def run_layer(cfg, mesh_shape, params, decls, x, r):
  """Output, dropped count and gradients (params, x) of the MoE block on a mesh."""
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(dict(dict(data=1, fsdp=1, expert=1, tensor=1), **mesh_shape))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:math.prod(mesh_shape.values())])

  def f(p, x):
    y, stats = moe.apply(jax.tree.map(lambda a: a[0], p), x, ModelSpec.from_config(cfg))
    return jnp.sum(y * r), (y, stats["dropped"])

  p_sh = params_lib.shardings(decls, mesh, cfg.sharding.params)
  x_sh = sharding.named(mesh, ("batch", "seq", "embed"), cfg.sharding.activations)
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True), in_shardings=(p_sh, x_sh))
    (gp, gx), (y, dropped) = fn(jax.device_put(params, p_sh), jax.device_put(x, x_sh))
  return jax.device_get((y, dropped, gp, gx))


def reference_layer(cfg, params, x, r, dropped_BTK=None):
  p = jax.tree.map(lambda a: a[0], params)

  def f(p, x):
    y, _ = reference_moe(p, x, cfg.model.moe, dropped_BTK)
    return jnp.sum(y * r), y

  (gp, gx), y = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(p, x)
  return y, jax.tree.map(lambda a: a[None], gp), gx


def assert_close(a, b, rtol=1e-4, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


MESHES = [dict(expert=4, data=2), dict(expert=8), dict(expert=2, fsdp=2, tensor=2)]
ROUTERS = {
    "softmax": dict(),
    "sigmoid_grouped_aux_free": dict(score="sigmoid", n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5, balance="aux_free"),
}


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("dispatch_kind", ["dropless", "capacity"])
def test_expert_parallel_layer_equals_one_expert_at_a_time(mesh_shape, dispatch_kind):
  router = "softmax" if dispatch_kind == "capacity" else "sigmoid_grouped_aux_free"
  # capacity_factor E/K: every expert has a slot for every token, so nothing drops.
  cfg = moe_config(dispatch=dispatch_kind, capacity_factor=E / K, **ROUTERS[router])
  decls, params = layer_params(cfg)
  if cfg.model.moe.balance == "aux_free":  # a bias that changes some selections
    params["router_bias"] = 0.3 * jax.random.normal(jax.random.key(5), params["router_bias"].shape)
  x, r = layer_inputs(cfg)
  y_ref, gp_ref, gx_ref = reference_layer(cfg, params, x, r)
  y, dropped, gp, gx = run_layer(cfg, mesh_shape, params, decls, x, r)
  assert dropped == 0
  assert_close(y, y_ref)
  assert_close(gx, gx_ref)
  assert_close(gp, gp_ref)
  np.testing.assert_array_equal(gp["router_bias"], 0.0)  # selection only: no gradient


@pytest.mark.parametrize("skew", [0.0, 4.0], ids=["balanced", "all_to_device_0"])
def test_dropless_expert_parallel_computes_any_load_exactly(skew):
  # A bias of +skew on experts 0 and 1 (device 0's under expert=4) sends every
  # assignment there: device 0 computes its whole worst-case buffer, the others nothing.
  cfg = moe_config(dispatch="dropless", **ROUTERS["sigmoid_grouped_aux_free"])
  decls, params = layer_params(cfg)
  params["router_bias"] = params["router_bias"].at[..., :2].set(skew)
  x, r = layer_inputs(cfg)
  y_ref, gp_ref, gx_ref = reference_layer(cfg, params, x, r)
  _, idx = reference_moe(jax.tree.map(lambda a: a[0], params), x, cfg.model.moe)
  on_device_0 = np.mean(np.asarray(idx) < 2)
  assert on_device_0 == 1.0 if skew else on_device_0 < 0.5
  y, dropped, gp, gx = run_layer(cfg, dict(expert=4, data=2), params, decls, x, r)
  assert dropped == 0
  assert_close(y, y_ref)
  assert_close(gx, gx_ref)
  assert_close(gp, gp_ref)


def test_row_buckets_end_with_the_whole_buffer():
  assert dispatch.row_buckets(4096, 1024) == (1280, 1536, 2048, 4096)
  assert dispatch.row_buckets(2048, 1024) == (1280, 1536, 2048)
  assert dispatch.row_buckets(100, 10) == (16, 24, 40, 100)


def expected_drops(idx_BTK, n_shards, cap):
  """Assignments past their expert's `cap`-th on each device, in k-major order per device."""
  B, T, K_ = idx_BTK.shape
  dropped = np.zeros(idx_BTK.shape, bool)
  for shard in np.split(np.arange(B), n_shards):
    counts = np.zeros(E, int)
    for k in range(K_):
      for b in shard:
        for t in range(T):
          e = idx_BTK[b, t, k]
          dropped[b, t, k] = counts[e] >= cap
          counts[e] += 1
  return dropped


@pytest.mark.parametrize("mesh_shape", [dict(data=1), dict(expert=4, data=2)],
                         ids=["one_device", "expert4xdata2"])
def test_capacity_drops_exactly_the_assignments_past_capacity(mesh_shape):
  cfg = moe_config(dispatch="capacity", capacity_factor=0.5)
  decls, params = layer_params(cfg)
  x, r = layer_inputs(cfg)
  n_shards = math.prod(mesh_shape.values())
  tokens_per_shard = cfg.train.batch_size * cfg.data.seq_len // n_shards
  cap = dispatch.capacity(tokens_per_shard * K, E, 0.5)
  _, idx = reference_moe(jax.tree.map(lambda a: a[0], params), x, cfg.model.moe)
  drops = expected_drops(np.asarray(idx), n_shards, cap)
  assert 0.2 < drops.mean() < 0.8
  y_ref, gp_ref, gx_ref = reference_layer(cfg, params, x, r, jnp.asarray(drops))
  y, dropped, gp, gx = run_layer(cfg, mesh_shape, params, decls, x, r)
  assert int(dropped) == drops.sum()
  assert_close(y, y_ref)
  assert_close(gp, gp_ref)


@pytest.mark.parametrize("how", ["blocked", "ragged_dot"])
def test_grouped_matmul_equals_a_loop_over_groups(how):
  rng = np.random.default_rng(3)
  sizes = np.array([5, 0, 17, 1, 9], np.int32)  # 32 rows, 8 of them past the groups
  x = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
  wg, wu = (jnp.asarray(rng.normal(size=(5, 6, 4)), jnp.float32) for _ in range(2))
  wd = jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32)
  y = dispatch.grouped_swiglu(x, jnp.asarray(sizes), wg, wu, wd, how)
  start = 0
  for g, n in enumerate(sizes):
    rows = x[start:start + n]
    expected = (jax.nn.silu(rows @ wg[g]) * (rows @ wu[g])) @ wd[g]
    np.testing.assert_allclose(y[start:start + n], expected, rtol=1e-5, atol=1e-5)
    start += n
  np.testing.assert_array_equal(y[start:], 0.0)


def skewed_router(n_tokens=512, d=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(1, n_tokens, d)).astype(np.float32)
  x[..., 0] = 1.0
  w = 0.3 * rng.normal(size=(d, E)).astype(np.float32)
  w[0, :2] += 3.0  # experts 0 and 1 win almost every token
  return jnp.asarray(x), {"router": jnp.asarray(w), "router_bias": jnp.zeros((E,))}


def test_aux_free_bias_balances_a_skewed_router():
  e = moe_config(score="sigmoid", balance="aux_free", bias_update_rate=0.01).model.moe
  x, p = skewed_router()
  mean = x.shape[1] * K / E

  @jax.jit
  def update(bias):
    _, _, idx, _ = moe.route(dict(p, router_bias=bias), x, e)
    load = jnp.sum(jax.nn.one_hot(idx, E), axis=(0, 1, 2))
    return moe.update_bias(bias[None], load[None], e.bias_update_rate)[0], load

  bias = p["router_bias"]
  imbalance = []
  for _ in range(150):
    bias, load = update(bias)
    imbalance.append(float(load.max()) / mean)
  assert imbalance[0] > 3.0
  assert max(imbalance[-20:]) < 1.25, imbalance[-20:]


def test_the_bias_changes_selection_never_gate_weights():
  e = moe_config(score="sigmoid", balance="aux_free", routed_scaling_factor=2.5).model.moe
  x, p = skewed_router()
  scores = jax.nn.sigmoid(x @ p["router"])
  _, _, idx0, gates0 = moe.route(p, x, e)
  bias = jnp.linspace(-0.5, 0.5, E)
  _, _, idx1, gates1 = moe.route(dict(p, router_bias=bias), x, e)
  assert np.mean(np.asarray(idx0) != np.asarray(idx1)) > 0.1  # the bias does move selections
  for idx, gates in ((idx0, gates0), (idx1, gates1)):
    chosen = jnp.take_along_axis(scores, idx, -1)
    np.testing.assert_allclose(gates, 2.5 * chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  # A bias equal for all experts selects the same experts with bit-identical gates.
  _, _, idx2, gates2 = moe.route(dict(p, router_bias=jnp.full((E,), 0.7)), x, e)
  np.testing.assert_array_equal(idx2, idx0)
  np.testing.assert_array_equal(gates2, gates0)


def test_train_step_moves_the_bias_by_gamma_from_the_load():
  cfg = moe_config(score="sigmoid", balance="aux_free", bias_update_rate=0.01, aux_loss_coef=0.0)
  cfg.mesh.update(data=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  s = state_lib.setup(cfg, mesh)
  state = state_lib.init_state(s, seed=0)
  bias0 = np.asarray(state["params"]["moe_layers"]["router_bias"])
  with jax.set_mesh(mesh):
    state, metrics_ = step_lib.make_train_step(s)(
        state, distributed.global_batch(random_batch(cfg), s.batch_sharding))
  metrics_, params = jax.device_get((metrics_, state["params"]))
  load = metrics_["moe_load"]
  assert load.sum() == cfg.train.batch_size * cfg.data.seq_len * K
  expected = bias0 + 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(params["moe_layers"]["router_bias"], expected, rtol=0, atol=1e-7)
  record = moe.summarize(metrics_)
  assert record["moe_drop_rate"] == metrics_["moe_dropped"] / load.sum()
  assert record["moe_bias_max"] == pytest.approx(expected.max())


def deepseek_like(**model):
  cfg = tiny_config(**dict(dict(
      n_layers=3, attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
      v_head_dim=16, mtp_depth=1,
      moe=dict(n_routed_experts=E, experts_per_token=K, n_shared_experts=1, first_k_dense=1,
               moe_intermediate_size=32, score="sigmoid", n_group=2, topk_group=1,
               balance="aux_free", aux_loss_coef=1e-4, aux_loss_scope="sequence")), **model))
  cfg.sharding.activations.batch = "data,fsdp,expert"
  return cfg


@pytest.mark.parametrize("moe_layer_freq", [1, 2])
def test_param_counts_total_and_active_match_the_tree(moe_layer_freq):
  cfg = deepseek_like(n_layers=4)
  cfg.model.moe.moe_layer_freq = moe_layer_freq
  tree = jax.eval_shape(lambda: init_params(cfg))
  assert [k for k in model.layer_kinds(cfg.model)] == (
      ["dense", "moe", "moe", "moe"] if moe_layer_freq == 1 else ["dense", "dense", "moe", "dense"])
  counts = cost.param_counts(cfg.model)
  assert counts["total"] == sum(x.size for x in jax.tree.leaves(tree))
  moe_layers = tree["moe_layers"]
  one_expert = sum(moe_layers[w].shape[2] * moe_layers[w].shape[3]
                   for w in ("w_gate", "w_up", "w_down"))
  n_moe = moe_layers["router"].shape[0]
  assert counts["total"] - counts["active"] == n_moe * (E - K) * one_expert


def test_flops_formula_counts_active_experts_as_xla_does():
  # Wide experts so matmuls dominate; capacity factor 1 computes exactly N K rows.
  cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, n_layers=2, scan_layers=False,
                    mtp_depth=1,
                    moe=dict(n_routed_experts=4, experts_per_token=2, n_shared_experts=1,
                             first_k_dense=1, moe_intermediate_size=256, dispatch="capacity",
                             capacity_factor=1.0))
  assert_flops_formula_matches_xla(cfg)


def test_dense_model_is_unchanged_by_moe_fields():
  base = tiny_config()
  other = tiny_config(moe=dict(n_routed_experts=0, experts_per_token=4, first_k_dense=1,
                               dispatch="dropless"))
  a, b = jitted_init(base), jitted_init(other)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert sorted(a) == ["embed", "final_norm", "layers", "unembed"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  batch = jax.tree.map(jnp.asarray, random_batch(base))
  loss_a, stats_a = jax.jit(lambda p: objectives.next_token(p, batch, ModelSpec.from_config(base), base.objective))(a)
  loss_b, stats_b = jax.jit(lambda p: objectives.next_token(p, batch, ModelSpec.from_config(other), other.objective))(b)
  assert float(loss_a) == float(loss_b) and set(stats_a) == set(stats_b)


@pytest.mark.parametrize("field, value, message", [
    ("moe.experts_per_token", 9, "model.moe.experts_per_token=9 must be in [1, n_routed_experts=8]"),
    ("moe.n_group", 3, "model.moe.n_group=3 must divide n_routed_experts=8"),
    ("moe.topk_group", 5, "model.moe.topk_group=5 must be in [1, n_group=4]"),
    ("moe.score", "relu", "model.moe.score='relu' is not one of softmax, sigmoid"),
    ("moe.dispatch", "sorted", "model.moe.dispatch='sorted' is not one of capacity, dropless"),
    ("moe.first_k_dense", 3, "model.moe.first_k_dense=3 must be in [0, n_layers=3)"),
    ("moe.capacity_factor", 0.0, "model.moe.capacity_factor=0.0 must be > 0"),
    ("moe.bias_update_rate", 0.0, "model.moe.bias_update_rate=0.0 must be > 0"),
    ("mtp_depth", -1, "model.mtp_depth=-1 must be >= 0"),
])
def test_invalid_moe_fields_are_one_line_errors(field, value, message):
  cfg = deepseek_like()
  cfg.model.moe.n_group = 4
  cfg.model.moe.topk_group = 2
  node, leaf = (cfg.model.moe, field[4:]) if field.startswith("moe.") else (cfg.model, field)
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    validate(cfg, 8)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_expert_sharding_needs_tokens_sharded_over_experts():
  cfg = deepseek_like()
  cfg.mesh.update(data=2, expert=4)
  cfg.sharding.activations.batch = "data,fsdp"
  with pytest.raises(config_lib.ConfigError, match="sharding.activations.batch='data,fsdp' must "
                                                   "include 'expert'"):
    validate(cfg, 8)


def test_mtp_loss_predicts_the_token_after_next():
  """Depth 1 against the same computation written out: shifted embeddings, one layer."""
  cfg = tiny_config(n_layers=1, mtp_depth=1, mtp_weight=0.5)
  params = jitted_init(cfg)
  batch = jax.tree.map(jnp.asarray, random_batch(cfg, docs_per_row=2))
  loss, stats = jax.jit(lambda p: objectives.next_token(p, batch, ModelSpec.from_config(cfg), cfg.objective))(params)
  logp = jax.jit(lambda p: mtp_reference_log_probs(p, batch, cfg))(params)
  tok, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  T = tok.shape[1]
  nll, n = 0.0, 0
  for b in range(tok.shape[0]):
    for i in range(T - 2):
      if seg[b, i] == seg[b, i + 1] == seg[b, i + 2]:
        nll -= float(logp[b, i, tok[b, i + 2]])
        n += 1
  assert n == tok.shape[0] * (T - 4)  # two documents per row
  assert float(stats["mtp_nll"]) == pytest.approx(nll, rel=1e-4)
  assert float(loss) == pytest.approx(float(stats["nll"]) + 0.5 * nll, rel=1e-5)


def mtp_reference_log_probs(params, batch, cfg):
  spec = ModelSpec.from_config(cfg)
  m = cfg.model
  x0 = model.embed(params, batch["tokens"], spec)
  x, _ = model.trunk(params, x0, batch["segment_ids"], batch["positions"], spec)
  p = jax.tree.map(lambda a: a[0], params["mtp"])
  rms = lambda v, g: v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + m.norm_eps) * g
  e_next = jnp.concatenate([x0[:, 1:], jnp.zeros_like(x0[:, :1])], 1)
  h = jnp.concatenate([rms(x, p["hnorm"]), rms(e_next, p["enorm"])], -1) @ p["proj"]
  rope_tables = block.layer_rope(batch["positions"], m)
  h, _, _ = block.apply(h, p["block"], rope_tables, batch["segment_ids"], spec, "dense")
  return jax.nn.log_softmax(model.unembed(params, rms(h, p["norm"]), spec), -1)


def test_cached_decoding_of_interleaved_moe_layers_equals_the_forward_pass():
  from test_decode import LENGTHS, STEPS, full_logits, ragged_rows, teacher_forced
  cfg = tiny_config(n_layers=3, moe=dict(n_routed_experts=E, experts_per_token=K,
                                         moe_intermediate_size=32, moe_layer_freq=2,
                                         dispatch="dropless"))
  assert model.runs(cfg.model) == [("moe", 0, 1), ("dense", 0, 1), ("moe", 1, 1)]
  params = jitted_init(cfg)
  rows = ragged_rows(cfg, LENGTHS, max(LENGTHS) + STEPS)
  decoded, cache = teacher_forced(params, cfg, rows, LENGTHS, STEPS)
  assert sorted(cache) == ["layers", "moe_layers"]
  full = full_logits(params, cfg, rows)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(decoded[b], full[b, n - 1:n + STEPS], rtol=2e-4, atol=2e-4)


def test_moe_model_trains_on_the_8_device_mesh_with_expert_parallelism(data_dir, tok, tmp_path):
  del tok  # built once for the suite
  cfg = deepseek_like(vocab_size=512, n_layers=2, mtp_depth=0)
  cfg.mesh.update(data=2, expert=4)
  cfg.model.moe.dispatch = "dropless"
  cfg.data.update(data_dir=data_dir, eval_batches=1)
  cfg.optimizer.update(lr=3e-3, warmup_steps=0)
  cfg.train.update(steps=6, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  cfg.checkpoint.update(every=0, keep=1)
  workdir = str(tmp_path)
  summary = loop.run(cfg, workdir)
  records = [r for r in metrics.read(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert records[-1]["loss"] < records[0]["loss"]
  assert summary["active_params"] < summary["params"]
  assert all(r["moe_drop_rate"] == 0.0 for r in records)
  assert np.asarray(records[-1]["moe_load"]).shape == (1, E)
  assert records[-1]["moe_bias_max"] > 0 > records[-1]["moe_bias_min"]
  assert os.path.getsize(os.path.join(workdir, "expert_load.png")) > 0
