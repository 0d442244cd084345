"""Log-likelihood scoring of many (context, continuation) sequences, packed into rows.

A request is (context ids, continuation ids); its score is the summed log-probability
of the continuation given the context, and whether every continuation token is
the model's greedy (argmax) choice. Two ways, both batched with fixed shapes
and jitted, and neither a pass per request:

- Shared context: requests with the same context (the choices of a
  multiple-choice question) run it once. Contexts, right-padded, fill a
  decoding cache (fmjax.nn.decoding.prefill); each continuation then runs from
  a copy of its context's cache rows, all of a batch in one pass
  (fmjax.nn.model.decode_cached).
- Packed: the others are packed best-fit into rows of `seq_len` tokens as
  documents of their own (segment ids and positions restart per document, so
  packed documents never attend to each other: fmjax.nn.model), and the rows go
  through the forward pass a batch at a time.

A request longer than the window keeps its last seq_len + 1 tokens (the context
is cut from the left), as lm-evaluation-harness does. Tokenisation follows the
harness too (`encode_pair`, `rolling_windows`), so fmjax.eval and the harness
adapter (fmjax.evaluation.harness) score the same token sequences.
"""

from __future__ import annotations

import bisect
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.nn import decoding, model, params as params_lib, sharding


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), BOS first.

  Trailing whitespace of the context moves to the continuation, and the pair is
  encoded whole and split after the context's own tokens, so the boundary is
  tokenised as in running text (as lm-evaluation-harness's causal models do).
  An empty context is the BOS token alone.
  """
  if not context:
    return [tokenizer.bos_id], tokenizer.encode(continuation)
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  context_ids = [tokenizer.bos_id] + tokenizer.encode(stripped)
  whole = [tokenizer.bos_id] + tokenizer.encode(stripped + continuation)
  return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: list[int], prefix: int,
                    seq_len: int) -> list[tuple[list[int], list[int]]]:
  """Requests that predict every token of `tokens` exactly once, in windows of seq_len.

  The first window predicts tokens[:seq_len] after `prefix`; each later one predicts
  the next seq_len tokens after the one before them, and the last is given a full
  window of context (lm-evaluation-harness's rolling windows, context_len=1).
  """
  out = []
  if not tokens:
    return out
  first = min(seq_len, len(tokens))
  out.append(([prefix], tokens[:first]))
  done = first
  while done < len(tokens):
    n = min(len(tokens) - done, seq_len)
    end = done + n
    window = tokens[max(end - seq_len - 1, 0):end - 1]  # the inputs: seq_len tokens
    out.append((window[:len(window) - (n - 1)], tokens[done:end]))
    done = end
  return out


@functools.partial(jax.jit, static_argnames=("spec",))
def token_scores(params, tokens_BL, segment_ids_BL, positions_BL, targets_BL, spec):
  """log p(target) at each position (B, L) and whether the target is the argmax."""
  logits_BLV = model.forward(params, tokens_BL, segment_ids_BL, positions_BL, spec)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
  return target_BL - logz_BL, greedy_BL


def batch_shards(mesh, spec) -> int:
  """How many ways the mesh splits a batch of rows (1 without a mesh)."""
  if mesh is None:
    return 1
  entry = sharding.spec(("batch",), spec.activations, "batch")[0]
  axes = (entry,) if isinstance(entry, str) else (entry or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def pack(requests, seq_len: int):
  """Rows of packed requests: (tokens, segment_ids, positions, targets) as (R, L) int32
  arrays, and for each request (row, first scored position, end).

  Best-fit decreasing: longest first, each into the fullest row it fits.
  """
  lengths, pieces = [], []
  for context, continuation in requests:
    if not continuation:
      raise ValueError("a request needs at least one continuation token")
    if len(continuation) > seq_len:
      raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                       f"{seq_len}-token window; split it (rolling_windows)")
    whole = (list(context) + list(continuation))[-(seq_len + 1):]
    pieces.append((whole[:-1], whole[1:], len(continuation)))
    lengths.append(len(whole) - 1)
  order = sorted(range(len(requests)), key=lambda i: -lengths[i])
  free, rows, placed = [], [], [None] * len(requests)  # free: sorted (space, row)
  for i in order:
    k = bisect.bisect_left(free, (lengths[i], -1))
    if k == len(free):
      rows.append([])
      space, row = seq_len, len(rows) - 1
    else:
      space, row = free.pop(k)
    rows[row].append(i)
    if space - lengths[i]:
      bisect.insort(free, (space - lengths[i], row))
  arrays = np.zeros((4, len(rows), seq_len), np.int32)
  for r, members in enumerate(rows):
    start = 0
    for s, i in enumerate(members):
      inputs, targets, n = pieces[i]
      end = start + len(inputs)
      arrays[0, r, start:end] = inputs
      arrays[1, r, start:end] = s + 1
      arrays[2, r, start:end] = np.arange(len(inputs))
      arrays[3, r, start:end] = targets
      placed[i] = (r, end - n, end)
      start = end
  return arrays, placed


def score(params, spec, requests, seq_len: int, *, rows: int = 8, mesh=None,
          share_contexts: bool = True) -> list[tuple[float, bool]]:
  """(summed log-probability, greedy) of each request's continuation.

  `requests` are (context ids, continuation ids). Requests that share their
  context with others run as shared contexts, `rows` contexts and up to
  CHOICES_PER_CONTEXT * rows continuations a pass; the rest packed, `rows`
  rows of seq_len tokens a pass (rounded up to a multiple of the mesh's batch
  shards). With `mesh`, `params` are expected on it and the batches are split
  over its batch axes. share_contexts=False packs them all.
  """
  out = [None] * len(requests)
  by_context = {}
  for i, (context, continuation) in enumerate(requests):
    if not continuation:
      raise ValueError("a request needs at least one continuation token")
    if len(continuation) > seq_len:
      raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                       f"{seq_len}-token window; split it (rolling_windows)")
    keep = seq_len + 1 - len(continuation)  # the context tokens that fit the window
    by_context.setdefault(tuple(context[-keep:]), []).append(i)
  shared = {c: members for c, members in by_context.items()
            if len(members) > 1 and share_contexts}
  alone = [i for c, members in by_context.items() if c not in shared for i in members]
  for i, result in zip(alone, _packed(params, spec, [requests[i] for i in alone], seq_len,
                                      rows, mesh)):
    out[i] = result
  for i, result in _shared(params, spec, requests, shared, seq_len, rows, mesh):
    out[i] = result
  return out


CHOICES_PER_CONTEXT = 4  # continuations per context a shared-context pass has room for


def _ceil(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _power_of_two(n: int, smallest: int) -> int:
  """The least power of two >= n and >= smallest."""
  return max(smallest, 1 << (n - 1).bit_length())


def _putter(mesh, spec):
  """Moves a host batch to the device(s): split over the mesh's batch axes if any."""
  if mesh is None:
    return jnp.asarray
  return lambda a: jax.device_put(a, sharding.named(
      mesh, ("batch",) + (None,) * (a.ndim - 1), spec.activations, name="batch"))


def _packed(params, spec, requests, seq_len, rows, mesh):
  if not requests:
    return []
  arrays, placed = pack(requests, seq_len)
  rows = _ceil(max(rows, 1), batch_shards(mesh, spec))
  total = _ceil(arrays.shape[1], rows)
  arrays = np.pad(arrays, ((0, 0), (0, total - arrays.shape[1]), (0, 0)))
  put, outs = _putter(mesh, spec), []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for b in range(0, total, rows):  # all dispatched before the first is read back
      outs.append(token_scores(params, *(put(a[b:b + rows]) for a in arrays), spec=spec))
    logp_RL = np.concatenate([np.asarray(o[0]) for o in outs])
    greedy_RL = np.concatenate([np.asarray(o[1]) for o in outs])
  return [(float(logp_RL[r, a:e].sum(dtype=np.float64)), bool(greedy_RL[r, a:e].all()))
          for r, a, e in placed]


def _shared(params, spec, requests, groups, seq_len, rows, mesh):
  """(index, score) of every request in `groups` ({context: request indices}).

  Contexts go shortest first into batches of B contexts and N continuations;
  the context and continuation widths are rounded up to powers of two, so
  that few shapes compile.
  """
  shards = batch_shards(mesh, spec)
  B = _ceil(max(rows, 1), shards)
  N = _ceil(CHOICES_PER_CONTEXT * B, shards)
  order = sorted(groups, key=len)
  batches, current, used = [], [], 0
  for context in order:
    n = len(groups[context])
    if current and (len(current) == B or used + n > N):
      batches.append(current)
      current, used = [], 0
    current.append(context)
    used += n
  if current:
    batches.append(current)
  put, pending = _putter(mesh, spec), []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for contexts in batches:
      members = [i for c in contexts for i in groups[c]]
      width = max(len(requests[i][1]) for i in members)
      P = min(_power_of_two(max(len(c) for c in contexts), 16), seq_len)
      C = _power_of_two(width, 4)
      n_total = max(N, _ceil(len(members), shards))  # one context may bring more than N
      context_BP = np.zeros((B, P), np.int32)
      length_B = np.ones(B, np.int32)
      continuation_NC = np.zeros((n_total, C), np.int32)
      owner_N, length_N = np.zeros(n_total, np.int32), np.zeros(n_total, np.int32)
      k = 0
      for b, c in enumerate(contexts):
        context_BP[b, :len(c)], length_B[b] = c, len(c)
        for i in groups[c]:
          continuation = requests[i][1]
          continuation_NC[k, :len(continuation)] = continuation
          owner_N[k], length_N[k] = b, len(continuation)
          k += 1
      arrays = (context_BP, length_B, continuation_NC, owner_N, length_N)
      pending.append((members, shared_context_scores(params, *map(put, arrays), spec=spec)))
    for members, (logp_N, greedy_N) in pending:
      logp_N, greedy_N = np.asarray(logp_N), np.asarray(greedy_N)
      for k, i in enumerate(members):
        yield i, (float(logp_N[k]), bool(greedy_N[k]))


@functools.partial(jax.jit, static_argnames=("spec",))
def shared_context_scores(params, context_BP, length_B, continuation_NC, owner_N, length_N,
                          spec):
  """Summed log p and greedy flag of N continuations, continuation n after context
  owner_N[n]: each context runs once into a cache, each continuation from a copy of
  its context's rows. Continuations are right-padded; length_N says how far."""
  P, C = context_BP.shape[1], continuation_NC.shape[1]
  decls = model.cache_decls(spec.model, context_BP.shape[0], P + C)
  cache = params_lib.init(decls, jax.random.key(0))  # zeros
  last_BV, cache = decoding.prefill(params, cache, context_BP, length_B, spec)
  batch_axis = jax.tree.map(lambda p: p.axes.index("batch"), decls,
                            is_leaf=lambda x: isinstance(x, params_lib.Param))
  cache = jax.tree.map(lambda c, a: jnp.take(c, owner_N, axis=a), cache, batch_axis)
  x_NCD = model.embed(params, continuation_NC, spec)
  h_NCD, _ = model.decode_cached(params, x_NCD, length_B[owner_N], cache, spec)
  # Token j of a continuation is predicted after token j - 1, the first after the context.
  after_NCV = model.unembed(params, h_NCD, spec)
  logits_NCV = jnp.concatenate([last_BV[owner_N][:, None], after_NCV[:, :-1]], axis=1)
  logp_NCV = jax.nn.log_softmax(logits_NCV, axis=-1)
  logp_NC = jnp.take_along_axis(logp_NCV, continuation_NC[..., None], axis=-1)[..., 0]
  inside_NC = jnp.arange(C)[None] < length_N[:, None]
  greedy_NC = jnp.argmax(logits_NCV, axis=-1) == continuation_NC
  return (jnp.sum(jnp.where(inside_NC, logp_NC, 0.0), axis=1),
          jnp.all(greedy_NC | ~inside_NC, axis=1))


def score_one_by_one(params, spec, requests, seq_len: int) -> list[tuple[float, bool]]:
  """The same scores, one forward pass per request, each padded to seq_len: the
  baseline that packing is measured against."""
  out = []
  for request in requests:
    arrays, placed = pack([request], seq_len)
    logp, greedy = token_scores(params, *map(jnp.asarray, arrays), spec=spec)
    _, a, e = placed[0]
    out.append((float(np.asarray(logp)[0, a:e].sum(dtype=np.float64)),
                bool(np.asarray(greedy)[0, a:e].all())))
  return out
