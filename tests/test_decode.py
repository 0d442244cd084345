"""Cached decoding against the full forward pass, for both attention kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.nn import decoding, model, sharding
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

MLA = dict(attention="mla", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12)
KINDS = {"gqa": {}, "mla": MLA}


def init_params(cfg, seed=0):
  return params_lib.init(model.param_decls(cfg.model), jax.random.key(seed))


def ragged_rows(cfg, lengths, total, seed=0):
  """Token rows of `total` ids; row b's prompt is its first lengths[b]."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, cfg.model.vocab_size, (len(lengths), total)).astype(np.int32)


def full_logits(params, cfg, rows):
  """Logits (B, T, V) of a plain forward pass over rows, right-padded to one length
  with padding in a segment of its own."""
  T = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), T), np.int32)
  segments = np.zeros((len(rows), T), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)], segments[b, :len(r)] = r, 1
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
  return np.asarray(jax.jit(lambda p: model.forward(p, tokens, segments, positions,
                                                               ModelSpec.from_config(cfg)))(params))


# Jitted once per spec (hashable), shared by the tests.
prefill = jax.jit(decoding.prefill, static_argnames="spec")
step = jax.jit(decoding.step, static_argnames=("spec", "absorbed"))


def teacher_forced(params, cfg, rows, lengths, steps, absorbed=True):
  """Logits (B, steps + 1, V): after each prompt, then after each of the next
  `steps` tokens of the row fed one at a time through the cache."""
  spec = ModelSpec.from_config(cfg)
  lengths = np.asarray(lengths, np.int32)
  B, P = len(lengths), int(lengths.max())
  prompts = np.where(np.arange(P) < lengths[:, None], rows[:, :P], 0)  # right padding
  cache = decoding.init_cache(spec, B, P + steps)
  logits, cache = prefill(params, cache, prompts, lengths, spec=spec)
  out = [np.asarray(logits)]
  for i in range(steps):
    positions = lengths + i
    logits, cache = step(params, cache, rows[np.arange(B), positions], positions, spec=spec,
                         absorbed=absorbed)
    out.append(np.asarray(logits))
  return np.stack(out, axis=1), cache


LENGTHS, STEPS = [5, 9, 2, 7], 6


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward_on_ragged_prompts(kind):
  cfg = tiny_config(**KINDS[kind])
  params = init_params(cfg)
  lengths, steps = LENGTHS, STEPS
  rows = ragged_rows(cfg, lengths, max(lengths) + steps)
  decoded, _ = teacher_forced(params, cfg, rows, lengths, steps)
  full = full_logits(params, cfg, rows)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(decoded[b], full[b, n - 1:n + steps], rtol=2e-4, atol=2e-4)


def test_absorbed_decoding_equals_expanded():
  cfg = tiny_config(**MLA)
  params = init_params(cfg, seed=1)
  lengths, steps = LENGTHS, STEPS
  rows = ragged_rows(cfg, lengths, max(lengths) + steps, seed=1)
  absorbed, _ = teacher_forced(params, cfg, rows, lengths, steps, absorbed=True)
  expanded, _ = teacher_forced(params, cfg, rows, lengths, steps, absorbed=False)
  np.testing.assert_allclose(absorbed, expanded, rtol=1e-4, atol=1e-4)
  assert np.abs(absorbed - absorbed[:, :1]).max() > 1e-2  # the logits do move


@pytest.mark.parametrize("kind,dtype", [("gqa", "float32"), ("mla", "float32"),
                                        ("gqa", "bfloat16"), ("mla", "bfloat16")])
def test_cache_bytes_per_token_per_layer(kind, dtype):
  cfg = tiny_config(dtype=dtype, **KINDS[kind])
  m = cfg.model
  B, S = 3, 10
  cache = jax.eval_shape(lambda: decoding.init_cache(ModelSpec.from_config(cfg), B, S))
  per_token_layer = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / (
      m.n_layers * B * S)
  size = np.dtype(jnp.dtype(dtype)).itemsize
  if kind == "mla":
    assert per_token_layer == (m.kv_lora_rank + m.qk_rope_head_dim) * size
  else:
    assert per_token_layer == 2 * m.n_kv_heads * (m.d_model // m.n_heads) * size


def test_sampling_rules():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 50)).astype(np.float32) * 3)
  order = np.argsort(-np.asarray(logits), axis=-1)
  keys = jax.random.split(jax.random.key(0), 100)
  greedy = decoding.sample_logits(logits, keys[0], 0.0)
  np.testing.assert_array_equal(greedy, order[:, 0])
  draw = jax.jit(jax.vmap(lambda k, t, tk, tp: decoding.sample_logits(logits, k, t, tk, tp),
                          in_axes=(0, None, None, None)), static_argnums=(1, 2, 3))
  top3 = np.asarray(draw(keys, 1.0, 3, 1.0))
  for b in range(4):
    assert set(top3[:, b]) == set(order[b, :3])  # all of the top 3, nothing else
  np.testing.assert_array_equal(np.asarray(draw(keys, 1.0, 1, 1.0)), np.tile(greedy, (100, 1)))
  # Nucleus: the smallest prefix of the sorted probabilities that reaches top_p.
  probs = np.asarray(jax.nn.softmax(logits))
  nucleus = np.asarray(draw(keys, 1.0, 0, 0.8))
  for b in range(4):
    sorted_p = probs[b, order[b]]
    n = int(np.searchsorted(np.cumsum(sorted_p), 0.8) + 1)
    assert set(nucleus[:, b]) <= set(order[b, :n])
    assert order[b, 0] in set(nucleus[:, b])
  np.testing.assert_array_equal(np.asarray(draw(keys, 1.0, 0, 1e-6)), np.tile(greedy, (100, 1)))


@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_greedy_decoding_and_compiles_one_step(kind):
  cfg = tiny_config(**KINDS[kind])
  params = init_params(cfg)
  prompts = [[3, 17, 9, 4], [8], [5, 6, 7]]
  before = decoding._step_and_sample._cache_size()
  out = decoding.generate(params, ModelSpec.from_config(cfg), prompts, max_new_tokens=7)
  assert decoding._step_and_sample._cache_size() == before + 1  # one step, not one per token
  # Each new token is the argmax of a full forward over what came before.
  logits = full_logits(params, cfg, [ids[:-1] for ids in out])
  for prompt, ids, row_logits in zip(prompts, out, logits):
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 7
    np.testing.assert_array_equal(ids[len(prompt):],
                                  row_logits[len(prompt) - 1:len(ids) - 1].argmax(-1))
  # A stop id ends a row; rows that stopped early are cut there.
  stop = out[1][2]
  stopped = decoding.generate(params, ModelSpec.from_config(cfg), prompts, max_new_tokens=7, stop_id=stop)
  assert stopped[1] == out[1][:3]


def test_sharded_cache_decodes_like_one_device():
  cfg = tiny_config(**MLA)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  spec = ModelSpec.from_config(cfg)
  cache = decoding.init_cache(spec, 4, 16, mesh)
  assert cache["latent"].sharding.spec == jax.sharding.PartitionSpec(
      None, ("data", "fsdp"), None, None)
  params = init_params(cfg)
  prompts = [[3, 17, 9, 4], [8], [5, 6, 7], [1, 2]]
  one = decoding.generate(params, spec, prompts, max_new_tokens=5, temperature=0.8, seed=3)
  shard = jax.jit(lambda p: p, out_shardings=params_lib.shardings(
      model.param_decls(cfg.model), mesh, cfg.sharding.params))
  with jax.set_mesh(mesh):
    sharded_params = shard(params)
  eight = decoding.generate(sharded_params, spec, prompts, max_new_tokens=5, temperature=0.8,
                            seed=3, mesh=mesh)
  assert one == eight
