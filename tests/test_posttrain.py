"""Post-training objectives (SFT, DPO, contrastive) and LoRA, against closed forms and one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from test_model import init_params
from fmjax.validate import validate
from fmjax import config as config_lib
from fmjax.posttrain import contrastive, dpo, lora, plan as posttrain
from fmjax.nn import model, sharding
from fmjax.train import objectives, records, state as state_lib, step as step_lib
from fmjax.runtime import distributed
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

MESH_222 = dict(data=2, fsdp=2, tensor=2)


def make_setup(cfg, mesh_shape=MESH_222):
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(mesh_shape)
  n = math.prod(mesh_shape.values())
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
  return state_lib.setup(cfg, mesh)


def example_rows(rng, cfg, B, prefix):
  """B rows of one example each: a prompt, a response, padding; loss_mask on the response."""
  T, V = cfg.data.seq_len, cfg.model.vocab_size
  rows = {f"{prefix}{k}": np.zeros((B, T), np.int32)
          for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  for b in range(B):
    prompt, n = int(rng.integers(3, T // 2)), int(rng.integers(T // 2 + 2, T))
    rows[f"{prefix}tokens"][b, :n] = rng.integers(4, V, n)
    rows[f"{prefix}segment_ids"][b, :n] = 1
    rows[f"{prefix}positions"][b, :n] = np.arange(n)
    rows[f"{prefix}loss_mask"][b, prompt - 1:n - 1] = 1  # next token is a response token
  return rows


def dpo_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B = cfg.train.batch_size
  batch = example_rows(rng, cfg, B, "chosen_")
  batch.update(example_rows(rng, cfg, B, "rejected_"))
  # Pairs share their prompt, as task_batches' do.
  for b in range(B):
    p = int(np.argmax(batch["chosen_loss_mask"][b])) + 1
    batch["rejected_tokens"][b, :p] = batch["chosen_tokens"][b, :p]
  return batch


def small_config():
  """Smaller than tiny_config: these tests compile several functions of it."""
  return tiny_config(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)


def dpo_config(**dpo_fields):
  cfg = small_config()
  cfg.objective.name = "dpo"
  cfg.objective.dpo.update(dpo_fields)
  cfg.checkpoint.init_from = "unused"
  return cfg


# DPO


def test_dpo_at_the_reference_is_ln2_with_zero_rewards():
  """One sharded train step with policy = reference: loss ln 2, every reward metric 0."""
  cfg = dpo_config(beta=0.1)
  s = make_setup(cfg)
  state = state_lib.init_state(s, seed=0)
  reference = jax.tree.map(jnp.copy, state["params"])
  step = step_lib.make_train_step(s, {"reference": reference})
  with jax.set_mesh(s.mesh):
    _, m = step(state, distributed.global_batch(dpo_batch(cfg), s.batch_sharding))
  record = objectives.summarize(jax.device_get(m))
  assert record["pairs"] == cfg.train.batch_size
  assert record["loss"] == np.float32(math.log(2))
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert record[k] == 0.0, k
  assert record["logps/chosen"] < 0


@pytest.mark.parametrize("kind,smoothing,expected", [
    ("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.2, math.log(2)), ("ipo", 0.0, 25.0),
    ("hinge", 0.0, 1.0)])
def test_dpo_losses_at_zero_margin(kind, smoothing, expected):
  d = dpo_config(loss=kind, beta=0.1, label_smoothing=smoothing).objective.dpo
  assert float(dpo.losses(jnp.zeros(()), d)) == pytest.approx(expected, rel=1e-6)
  # A positive margin (chosen preferred beyond the reference) lowers every loss.
  assert float(dpo.losses(jnp.ones(()), d)) < expected


def test_dpo_gradient_raises_chosen_over_rejected():
  """At policy = reference, grad(sigmoid loss) = -beta/2 grad(sum log pi(chosen) - log pi(rejected)),
  and a step against it raises the chosen log-probs relative to the rejected ones."""
  cfg = dpo_config(beta=0.5)
  params = init_params(cfg)
  batch = jax.tree.map(jnp.asarray, dpo_batch(cfg, seed=1))

  def margin(p):
    c, r = dpo.pair_logps(p, batch, ModelSpec.from_config(cfg))
    return jnp.sum(c - r)

  @jax.jit
  def evaluate(p, reference):
    (loss, _), loss_grad = jax.value_and_grad(
        lambda q: dpo.dpo(q, batch, ModelSpec.from_config(cfg), cfg.objective, reference=reference), has_aux=True)(p)
    return loss, loss_grad, margin(p), jax.grad(margin)(p)

  loss, loss_grad, before, margin_grad = evaluate(params, params)
  assert float(loss) == pytest.approx(cfg.train.batch_size * math.log(2), rel=1e-6)
  jax.tree.map(lambda g, h: np.testing.assert_allclose(g, -0.25 * h, rtol=1e-4, atol=1e-6),
               loss_grad, margin_grad)
  lr = 1e-3 / float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(loss_grad))))
  stepped = jax.tree.map(lambda p, g: p - lr * g, params, loss_grad)
  loss_after, _, after, _ = evaluate(stepped, params)
  assert float(after) > float(before)
  assert float(loss_after) < float(loss)


def test_precomputed_reference_logps_give_the_same_statistics():
  cfg = dpo_config()
  params = init_params(cfg)
  other = jax.tree.map(lambda x: x * 1.01, params)
  batches = [dpo_batch(cfg, seed) for seed in (2, 3)]
  logps = jax.jit(lambda b: dpo.pair_logps(other, b, ModelSpec.from_config(cfg)))
  # The last "batch" is short: precompute pads it.
  short = {k: v[:3] for k, v in batches[1].items()}
  table = dpo.precompute(logps, [batches[0], short], cfg.train.batch_size)
  assert len(table) == cfg.train.batch_size + 3
  attached = dpo.AttachReference(table).map(batches[0])
  assert attached["chosen_ref_logps"].shape == (cfg.train.batch_size, 1)
  online = jax.jit(lambda b: dpo.dpo(params, b, ModelSpec.from_config(cfg), cfg.objective, reference=other)[1])(batches[0])
  pre = jax.jit(lambda b: dpo.dpo(params, b, ModelSpec.from_config(cfg), cfg.objective)[1])(attached)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), pre, online)
  with pytest.raises(KeyError, match="no precomputed reference"):
    dpo.AttachReference(table).map(batches[1])


# SFT


def test_sft_loss_is_the_response_tokens_cross_entropy():
  """Against a numpy cross-entropy over the response positions only: prompts carry no loss."""
  cfg = small_config()
  rows = example_rows(np.random.default_rng(4), cfg, cfg.train.batch_size, "")
  params = init_params(cfg)
  batch = jax.tree.map(jnp.asarray, rows)
  loss, stats, logits = jax.jit(lambda b: objectives.OBJECTIVES["sft"](params, b, ModelSpec.from_config(cfg), cfg.objective) + (
      model.forward(params, b["tokens"], b["segment_ids"], b["positions"], ModelSpec.from_config(cfg)),))(batch)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected, count = 0.0, 0
  for b in range(rows["tokens"].shape[0]):
    for t in np.flatnonzero(rows["loss_mask"][b]):
      expected -= logp[b, t, rows["tokens"][b, t + 1]]
      count += 1
  assert float(stats["tokens"]) == count < (rows["segment_ids"] > 0).sum() - rows["tokens"].shape[0]
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # The loss does not depend on the logits at prompt positions.
  def from_logits(lg):
    targets, weights = objectives.next_token_targets(batch)
    return objectives.cross_entropy_sums(lg, targets, weights, 0.0)[0]
  g = np.asarray(jax.grad(from_logits)(jnp.asarray(logits, jnp.float32)))
  prompt = (rows["loss_mask"] == 0)
  assert np.abs(g[prompt]).max() == 0.0 and np.abs(g[~prompt]).max() > 0
  with pytest.raises(ValueError, match="loss_mask"):
    objectives.OBJECTIVES["sft"](
        params, {k: v for k, v in batch.items() if k != "loss_mask"}, ModelSpec.from_config(cfg), cfg.objective)


# Contrastive


def pair_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B = cfg.train.batch_size
  batch = {}
  for side in ("anchor_", "positive_"):
    rows = example_rows(rng, cfg, B, side)
    batch.update({k: v for k, v in rows.items() if not k.endswith("loss_mask")})
  return batch


def contrastive_config(**fields):
  cfg = small_config()
  cfg.objective.name = "contrastive"
  cfg.objective.contrastive.update(fields)
  cfg.train.batch_size = 16
  return cfg


def numpy_info_nce(a, p, scale, symmetric):
  logits = np.exp(scale) * a @ p.T
  lse = lambda x, axis: np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis)) + x.max(axis)  # noqa: E731
  loss = lse(logits, 1) - np.diag(logits)
  if symmetric:
    loss = 0.5 * (loss + lse(logits, 0) - np.diag(logits))
  return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_numpy(symmetric):
  rng = np.random.default_rng(5)
  a, p = rng.normal(size=(2, 6, 4)).astype(np.float32)
  got, _ = contrastive.info_nce(jnp.asarray(a), jnp.asarray(p), jnp.float32(1.5), symmetric)
  np.testing.assert_allclose(got, numpy_info_nce(a, p, 1.5, symmetric), rtol=1e-5, atol=1e-6)


def test_contrastive_sharded_equals_one_device(pooling="last", projection=16):
  """The loss over a batch split across 8 devices equals one device's on the same global
  batch (the negatives are global), and differs from that of per-shard negatives."""
  cfg = contrastive_config(pooling=pooling, projection_dim=projection)
  batch = pair_batch(cfg)
  results = {}
  for name, mesh_shape in (("one", dict(data=1, fsdp=1, tensor=1)),
                           ("eight", dict(data=4, fsdp=2, tensor=1))):
    s = make_setup(cfg, mesh_shape)
    params = state_lib.init_state(s, seed=0)["params"]
    with jax.set_mesh(s.mesh):
      stats = step_lib.make_eval_step(s)(params, distributed.global_batch(batch, s.batch_sharding))
    results[name] = jax.device_get(stats), jax.device_get(params)
  (one, params), (eight, _) = results["one"], results["eight"]
  assert one["pairs"] == eight["pairs"] == 16
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
  assert eight["accuracy"] == one["accuracy"]
  record = objectives.summarize({k: one[k] for k in ("pairs", "loss", "temperature")})
  assert record["temperature"] == pytest.approx(0.07, rel=1e-5)
  # Negatives from one shard only (2 pairs each) would give another, lower, loss.
  jb = jax.tree.map(jnp.asarray, batch)
  emb = {side: contrastive.embed(params, jb[f"{side}_tokens"], jb[f"{side}_segment_ids"],
                                 jb[f"{side}_positions"], ModelSpec.from_config(cfg),
                                 cfg.objective.contrastive) for side in ("anchor", "positive")}
  scale = float(contrastive.logit_scale(params, cfg.objective.contrastive))
  a, p = np.asarray(emb["anchor"]), np.asarray(emb["positive"])
  np.testing.assert_allclose(numpy_info_nce(a, p, scale, True).sum(), one["loss"], rtol=1e-5)
  local = sum(numpy_info_nce(a[i:i + 2], p[i:i + 2], scale, True).sum() for i in range(0, 16, 2))
  assert local < 0.8 * one["loss"]


def test_temperature_is_clamped_as_in_clip():
  cfg = contrastive_config(temperature=0.001, max_logit_scale=100.0)
  params = params_lib.init(posttrain.param_decls(cfg), jax.random.key(0))
  assert float(params["head"]["logit_scale"]) == pytest.approx(math.log(1000))
  assert float(jnp.exp(contrastive.logit_scale(params, cfg.objective.contrastive))) == pytest.approx(100.0)
  _, stats = contrastive.contrastive(params, jax.tree.map(jnp.asarray, pair_batch(cfg)),
                                    ModelSpec.from_config(cfg), cfg.objective)
  assert float(stats["temperature"]) / 16 == pytest.approx(0.01)


# LoRA


def lora_config(objective="next_token", targets="layers.w[qo]$, layers.w_down, unembed"):
  cfg = small_config()
  cfg.lora.update(rank=4, alpha=8.0, targets=targets)
  cfg.objective.name = objective
  if objective == "contrastive":
    cfg.train.batch_size = 16
  return cfg


def test_lora_adapters_are_declared_and_sharded_like_their_weights():
  cfg = lora_config()
  s = make_setup(cfg, dict(data=2, fsdp=2, tensor=2))
  assert {n for n, _ in lora.targets(model.param_decls(cfg.model), cfg.lora)} == {
      "layers.wq", "layers.wo", "layers.w_down", "unembed"}
  sh = s.state_shardings["params"]
  cfg.sharding.params.embed = "fsdp"
  L, D, N, H = 1, 32, 2, 16
  shapes = jax.tree.map(lambda x: x.shape, s.abstract_state["params"]["lora"])
  assert shapes["layers"]["wq"] == {"a": (L, D, 4), "b": (L, 4, N, H)}
  assert shapes["layers"]["wo"] == {"a": (L, N, H, 4), "b": (L, 4, D)}
  assert shapes["unembed"] == {"a": (D, 4), "b": (4, cfg.model.vocab_size)}
  # A is split like its weight's input axes, B like its output axes.
  wq, ad = sh["layers"]["wq"].spec, sh["lora"]["layers"]["wq"]
  assert ad["a"].spec[:2] == wq[:2] and ad["b"].spec[2:] == wq[2:]
  wo, ad = sh["layers"]["wo"].spec, sh["lora"]["layers"]["wo"]
  assert tuple(ad["a"].spec)[:3] == tuple(wo)[:3] and tuple(ad["b"].spec)[2:] == tuple(wo)[3:]


def test_lora_merge_against_explicit_products():
  cfg = lora_config()
  params = params_lib.init(posttrain.param_decls(cfg), jax.random.key(0))
  rng = np.random.default_rng(6)
  params["lora"] = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                params["lora"])
  merged = lora.merge(params, cfg.lora)
  ad, scale = params["lora"], 8.0 / 4
  np.testing.assert_allclose(merged["layers"]["wq"], params["layers"]["wq"] + scale * np.einsum(
      "ldr,lrnh->ldnh", ad["layers"]["wq"]["a"], ad["layers"]["wq"]["b"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["layers"]["wo"], params["layers"]["wo"] + scale * np.einsum(
      "lnhr,lrd->lnhd", ad["layers"]["wo"]["a"], ad["layers"]["wo"]["b"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["unembed"], params["unembed"] + scale * (
      ad["unembed"]["a"] @ ad["unembed"]["b"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["layers"]["wk"], params["layers"]["wk"])
  assert "lora" not in merged


def test_lora_starts_as_a_no_op_and_trains_only_adapters(objective="next_token"):
  """(tests/test_posttrain_pipeline.py runs LoRA with DPO through the loop.)"""
  from test_model import random_batch
  cfg = lora_config(objective)
  s = make_setup(cfg)
  state = state_lib.init_state(s, seed=0)
  before = jax.device_get(state["params"])
  base = {k: v for k, v in before.items() if k not in posttrain.ADDED}
  # Zero-initialised B: the model's outputs are those of the base weights, exactly.
  b = random_batch(cfg)
  spec = ModelSpec.from_config(cfg)
  fwd = lambda p: model.forward(p, b["tokens"], b["segment_ids"], b["positions"], spec)  # noqa: E731
  np.testing.assert_array_equal(fwd(posttrain.model_params(before, cfg)), fwd(base))
  # No optimizer state for the frozen weights: AdamW's moments mirror the adapters (and head).
  trained = {"lora"} | ({"head"} if objective == "contrastive" else set())
  mu = state["opt_state"].inner_state[1][0].mu
  assert set(mu) == trained
  assert jax.tree.structure(mu["lora"]) == jax.tree.structure(before["lora"])
  batch = pair_batch(cfg) if objective == "contrastive" else b
  with jax.set_mesh(s.mesh):
    state, m = step_lib.make_train_step(s)(state, distributed.global_batch(batch, s.batch_sharding))
  after = jax.device_get(state["params"])
  assert float(m["grad_norm"]) > 0
  jax.tree.map(np.testing.assert_array_equal, {k: after[k] for k in base}, base)
  moved = jax.tree.map(lambda x, y: np.abs(x - y).max() > 0, after["lora"], before["lora"])
  assert all(jax.tree.leaves(jax.tree.map(lambda ab: ab, {n: v["b"] for n, v in
                                                          moved["layers"].items()})))
  summary = records.run_summary(cfg, s)
  assert summary["trained_params"] == sum(x.size for k in trained
                                          for x in jax.tree.leaves(before[k]))


# Config


BAD = [
    ("objective.dpo.loss", "kto", "objective.dpo.loss='kto' is not one of sigmoid, ipo, hinge"),
    ("objective.dpo.beta", 0.0, "objective.dpo.beta=0.0 must be > 0"),
    ("objective.dpo.label_smoothing", 0.5, "objective.dpo.label_smoothing=0.5 must be in [0, 0.5)"),
    ("objective.contrastive.pooling", "max", "objective.contrastive.pooling='max' is not one of mean, last"),
    ("objective.contrastive.temperature", -1.0, "objective.contrastive.temperature=-1.0 must be > 0"),
    ("objective.contrastive.projection_dim", -2, "objective.contrastive.projection_dim=-2 must be >= 0"),
    ("objective.contrastive.max_logit_scale", 0.5, "objective.contrastive.max_logit_scale=0.5 must be >= 1"),
    ("lora.rank", -1, "lora.rank=-1 must be >= 0"),
    ("lora.alpha", 0.0, "lora.alpha=0.0 must be > 0"),
    ("lora.targets", "layers.wz", "lora.targets='layers.wz' matches no weight matrix"),
    ("lora.targets", "", "lora.rank=4 needs lora.targets"),
    ("lora.targets", "layers.w[q", "lora.targets: 'layers.w[q' is not a regular expression"),
    ("data.task_size", -5, "data.task_size=-5 must be >= 0"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_posttraining_fields_get_one_line_errors(path, value, message):
  cfg = tiny_config()
  if path.startswith("lora") and path != "lora.rank":
    cfg.lora.update(rank=4, targets="layers.wq")
  node = cfg
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    validate(cfg, n_devices=8)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_objective_requirements_get_one_line_errors():
  cfg = tiny_config()
  cfg.objective.name = "dpo"
  with pytest.raises(config_lib.ConfigError, match="needs a reference model"):
    validate(cfg, n_devices=8)
  cfg.objective.dpo.reference = "runs/sft_tiny"
  validate(cfg, n_devices=8)
  cfg = contrastive_config()
  cfg.train.microbatches = 2
  with pytest.raises(config_lib.ConfigError, match="must be 1 for objective.name='contrastive'"):
    validate(cfg, n_devices=8)
