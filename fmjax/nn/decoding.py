"""Autoregressive decoding with a cache: prefill once, then one jitted step per token.

The cache is declared like parameters (`model.cache_decls`: shapes, logical
axes, zeros) and sharded by the activation rules. GQA caches keys and values;
MLA caches its normed latent and rotary key only, and decodes in the absorbed
form.

Batches of prompts of different lengths are right-padded: every row's tokens
sit at positions 0, 1, ... of its own, the first new token of row b goes to
position len_b and slot len_b, overwriting the padding there. A query sees the
slots up to its own position only, so what padding left behind is never read.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.nn import model
from fmjax.nn import params as params_lib


def init_cache(spec, batch: int, length: int, mesh=None):
  """An empty cache of `length` slots per row; sharded over `mesh` if one is given."""
  decls = model.cache_decls(spec.model, batch, length)
  init = functools.partial(params_lib.init, decls)
  if mesh is None:
    return jax.jit(init)(jax.random.key(0))
  shardings = params_lib.shardings(decls, mesh, spec.activations)
  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(0))


def prefill(params, cache, tokens_BP, lengths_B, spec):
  """Runs right-padded prompts into an empty cache: the logits (B, V) after each
  row's last prompt token (index lengths_B[b] - 1), and the filled cache."""
  x_BPD = model.embed(params, tokens_BP, spec)
  start_B = jnp.zeros(tokens_BP.shape[:1], jnp.int32)
  h_BPD, cache = model.decode_cached(params, x_BPD, start_B, cache, spec, absorbed=False)
  h_B1D = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)
  return model.unembed(params, h_B1D, spec)[:, 0], cache


def step(params, cache, tokens_B, positions_B, spec, absorbed=True):
  """One token per row at its position: the next-token logits (B, V) and the cache."""
  x_B1D = model.embed(params, tokens_B[:, None], spec)
  h_B1D, cache = model.decode_cached(params, x_B1D, positions_B, cache, spec, absorbed)
  return model.unembed(params, h_B1D, spec)[:, 0], cache


def sample_logits(logits_BV, key, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Token ids (B,): greedy at temperature 0; otherwise sampled at `temperature`
  from the `top_k` most likely tokens (0: all) and the smallest set of them whose
  probability reaches `top_p` (nucleus sampling; 1: all)."""
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec", "sampling"), donate_argnames=("cache",))
def _prefill_and_sample(params, cache, tokens_BP, lengths_B, key, spec, sampling):
  logits_BV, cache = prefill(params, cache, tokens_BP, lengths_B, spec)
  return sample_logits(logits_BV, key, *sampling), cache


@functools.partial(jax.jit, static_argnames=("spec", "sampling"), donate_argnames=("cache",))
def _step_and_sample(params, cache, tokens_B, positions_B, key, index, spec, sampling):
  logits_BV, cache = step(params, cache, tokens_B, positions_B, spec)
  return sample_logits(logits_BV, jax.random.fold_in(key, index), *sampling), cache


def generate(params, spec, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_id: int | None = None, mesh=None, progress=None) -> list[list[int]]:
  """Each prompt followed by up to `max_new_tokens` generated ids (ending at `stop_id`).

  Compiles one prefill and one step for the batch shape; the step then runs
  once per token. Pass `mesh` to shard the cache and the batch over it, and
  `progress` to be called with the number of tokens generated so far as each
  one arrives.
  """
  if not prompts or any(not p for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
  if max_new_tokens <= 0:
    return [list(p) for p in prompts]
  sampling = (float(temperature), int(top_k), float(top_p))
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  tokens_BP = np.zeros((len(prompts), lengths_B.max()), np.int32)
  for row, prompt in zip(tokens_BP, prompts):
    row[:len(prompt)] = prompt
  key = jax.random.key(seed)
  params = jax.tree.map(jnp.asarray, params)  # on device once, not at every step
  cache = init_cache(spec, len(prompts), int(lengths_B.max()) + max_new_tokens, mesh)

  new = []  # fetched tokens, one (B,) array per step
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    token_B, cache = _prefill_and_sample(params, cache, tokens_BP, lengths_B, key,
                                         spec=spec, sampling=sampling)
    for i in range(1, max_new_tokens):
      # Token i-1 is fed back on device; it is fetched while step i runs.
      next_B, cache = _step_and_sample(params, cache, token_B, lengths_B + (i - 1), key,
                                       np.int32(i), spec=spec, sampling=sampling)
      new.append(np.asarray(token_B))
      if progress is not None:
        progress(len(new))
      if stop_id is not None and (np.stack(new) == stop_id).any(axis=0).all():
        break
      token_B = next_B
    else:
      new.append(np.asarray(token_B))
      if progress is not None:
        progress(len(new))

  out = []
  for b, prompt in enumerate(prompts):
    ids = [int(t) for t in np.stack(new)[:, b]]
    if stop_id is not None and stop_id in ids:
      ids = ids[:ids.index(stop_id) + 1]
    out.append(list(prompt) + ids)
  return out


def sample_texts(params, spec, tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
                 mesh=None, progress=None) -> list[str]:
  """Each prompt's continuation as text, decoded as one batch; stops at the tokenizer's EOS.

  `tokenizer` has encode, decode, bos_id and eos_id (fmjax.data.tokenizer.Tokenizer);
  `progress` is `generate`'s.
  """
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = generate(params, spec, ids, max_new_tokens, temperature, top_k, top_p, seed,
                 stop_id=tokenizer.eos_id, mesh=mesh, progress=progress)
  return [tokenizer.decode([t for t in o[1:] if t != tokenizer.eos_id]) for o in out]
