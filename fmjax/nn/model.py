"""The decoder: parameter declarations and the forward pass.

Pre-norm Transformer layers (fmjax/nn/block.py: RMSNorm, then attention; RMSNorm,
then the feed-forward block), stacked along a leading 'layers' axis and run
with `jax.lax.scan`. The attention kind is `model.attention`: grouped-query
(fmjax/nn/gqa.py) or multi-head latent attention (fmjax/nn/mla.py). The
feed-forward block is the dense MLP (fmjax/nn/mlp.py) or, with
`model.moe.n_routed_experts > 0`, a mixture of experts (fmjax/nn/moe.py) in the
layers `layer_kinds` says: those stack under params['moe_layers'], the dense
ones under params['layers'] (a dense model's tree is only that), and
consecutive layers of one kind run as one scan over a slice of their stack.
Layers with a sliding window and layers with full attention (`local_layers`:
Gemma's local/global pattern) share a stack: each scanned layer carries a flag.

Every function takes a `ModelSpec` (fmjax/nn/spec.py): the model reads
`spec.model` and pins its activations with the rules in `spec.activations`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.nn import block as block_lib
from fmjax.nn import layers, moe, mtp
from fmjax.nn import params as params_lib
from fmjax.nn.params import Param, normal
from fmjax.nn.sharding import constrain

ATTENTION = block_lib.ATTENTION
STACKS = {"dense": "layers", "moe": "moe_layers"}  # parameter subtree of each layer kind

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_kinds(m) -> list[str]:
  """'dense' or 'moe' for each layer, as DeepSeek-V3 places them."""
  e = m.moe
  return ["moe" if e.n_routed_experts and i >= e.first_k_dense and i % e.moe_layer_freq == 0
          else "dense" for i in range(m.n_layers)]


def stack_sizes(m) -> dict[str, int]:
  """Layers of each kind present, dense first."""
  kinds = layer_kinds(m)
  return {k: kinds.count(k) for k in STACKS if k in kinds}


def local_layers(m) -> list[bool]:
  """Whether each layer keeps model.sliding_window: all of them, or with
  full_attention_every = k all but layers k-1, 2k-1, ... (Gemma's local/global layers)."""
  W, k = m.sliding_window, m.full_attention_every
  return [bool(W) and not (k and (i + 1) % k == 0) for i in range(m.n_layers)]


def runs(m) -> list[tuple[str, int, int]]:
  """(kind, first index in its stack, count) of each run of consecutive layers of one kind."""
  out, seen = [], dict.fromkeys(STACKS, 0)
  for kind in layer_kinds(m):
    if out and out[-1][0] == kind:
      out[-1][2] += 1
    else:
      out.append([kind, seen[kind], 1])
    seen[kind] += 1
  return [tuple(r) for r in out]


def param_decls(m) -> dict:
  """Declarations of every parameter of the model config `m`."""
  D, V = m.d_model, m.vocab_size
  decls = {"embed": Param((V, D), ("vocab", "embed"), normal(m.init_std))}
  for kind, n in stack_sizes(m).items():
    decls[STACKS[kind]] = block_lib.decls(m, kind, n)
  decls["final_norm"] = layers.norm_scale((D,), ("embed",), m)
  if not m.tie_embeddings:
    decls["unembed"] = Param((D, V), ("embed", "vocab"), normal(m.init_std))
  if m.mtp_depth:
    decls["mtp"] = mtp.decls(m)
  return params_lib.parametrize(decls, m)  # SP: as declared; µP: init and LR by role


def cache_decls(m, batch: int, length: int) -> dict:
  """The decoding cache of `length` slots for `batch` rows, declared like parameters.

  A dense model's is one stack over its layers; with MoE layers, one per stack.
  """
  cache = ATTENTION[m.attention].cache_decls(m, batch, length)
  sizes = stack_sizes(m)
  if list(sizes) == ["dense"]:
    return cache
  return {STACKS[k]: block_lib.restack(cache, n) for k, n in sizes.items()}


def _run_layers(block, x_BTD, xs, m):
  """Folds `block(x, layer slices) -> (x, y)` over a stack; ys come back stacked."""
  with jax.named_scope("layers"):
    if m.scan_layers:
      return jax.lax.scan(block, x_BTD, xs)
    ys = []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
      x_BTD, y = block(x_BTD, jax.tree.map(lambda a: a[i], xs))
      ys.append(y)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _run_stacks(make_block, x_BTD, stacks, m):
  """Runs every layer in order, `make_block(kind)` folding over slices of `stacks[kind]`.

  The block gets (its slice, local): whether the layer keeps the sliding window
  (`local_layers`), a Python bool when all layers agree, else a scanned array.
  Returns x and, per kind, the blocks' ys concatenated in stack order.
  """
  ys, local = {}, local_layers(m)
  mixed, first = len(set(local)) > 1, 0
  for kind, start, count in runs(m):
    xs = stacks[kind]
    if count != jax.tree.leaves(xs)[0].shape[0]:
      xs = jax.tree.map(lambda a: a[start:start + count], xs)
    block = make_block(kind)
    if mixed:
      xs = (xs, jnp.asarray(local[first:first + count]))
    else:
      block = lambda x, layer, block=block: block(x, (layer, local[0]))
    x_BTD, y = _run_layers(block, x_BTD, xs, m)
    ys.setdefault(kind, []).append(y)
    first += count
  return x_BTD, {k: y[0] if len(y) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *y)
                 for k, y in ys.items()}


def embed(params, tokens_BT, spec) -> jax.Array:
  m, rules = spec.model, spec.activations
  with jax.named_scope("embed"):
    # Gather the table whole first (as FSDP does for every weight): a lookup
    # into a vocab-sharded table is not something the partitioner does well.
    table_VD = constrain(params["embed"], (None, "embed"), rules)
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
    if m.scale_embeddings:  # Gemma: times sqrt(d_model)
      x_BTD = x_BTD * jnp.float32(m.d_model**0.5)
    x_BTD = x_BTD.astype(jnp.dtype(m.dtype))
    return constrain(x_BTD, ("batch", "seq", "embed"), rules)


def trunk(params, x_BTD, segment_ids_BT, positions_BT, spec):
  """Runs the layers over embeddings: hidden states (B, T, D) before the final norm,
  and the MoE layers' statistics (fmjax.nn.moe.STATS, stacked over MoE layers; {} if none)."""
  m = spec.model
  rope_tables = block_lib.layer_rope(positions_BT, m)

  def make_block(kind):
    def block(x_BTD, layer):
      p, local = layer
      x_BTD, _, stats = block_lib.apply(x_BTD, p, rope_tables, segment_ids_BT, spec, kind,
                                        local=local)
      return x_BTD, stats

    if m.remat != "none":
      block = jax.checkpoint(block, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
    return block

  stacks = {kind: params[STACKS[kind]] for kind in stack_sizes(m)}
  x_BTD, ys = _run_stacks(make_block, x_BTD, stacks, m)
  return x_BTD, ys.get("moe", {})


def final_norm(params, x_BTD, spec):
  return layers.norm(x_BTD, params["final_norm"], spec.model)


def decode(params, x_BTD, segment_ids_BT, positions_BT, spec) -> jax.Array:
  """Runs the layers and the final norm over embeddings: hidden states (B, T, D)."""
  return final_norm(params, trunk(params, x_BTD, segment_ids_BT, positions_BT, spec)[0], spec)


def decode_cached(params, x_BTD, start_B, cache, spec, absorbed=False):
  """Hidden states (B, T, D) of T new tokens per row, and the updated cache.

  Row b's new tokens sit at positions start_B[b] + [0, T); they are written
  into cache slots of the same index and attend to every slot up to their own
  position, so a row's earlier slots must hold its earlier tokens. Slots past
  a position are masked, whatever they hold (padding, stale entries).
  """
  m = spec.model
  rope_tables = block_lib.layer_rope(layers.positions(start_B, x_BTD.shape[1]), m)

  def make_block(kind):
    def block(x_BTD, layer):
      (p, c), local = layer
      x_BTD, c, _ = block_lib.apply(x_BTD, p, rope_tables, None, spec, kind, c, start_B,
                                    absorbed, local)
      return x_BTD, c
    return block

  kinds = stack_sizes(m)
  caches = {"dense": cache} if list(kinds) == ["dense"] else {k: cache[STACKS[k]] for k in kinds}
  stacks = {k: (params[STACKS[k]], caches[k]) for k in kinds}
  x_BTD, caches = _run_stacks(make_block, x_BTD, stacks, m)
  cache = caches["dense"] if list(kinds) == ["dense"] else {STACKS[k]: c for k, c in caches.items()}
  return final_norm(params, x_BTD, spec), cache


def unembed(params, h_BTD, spec) -> jax.Array:
  """Logits (B, T, V) in float32."""
  m, rules = spec.model, spec.activations
  with jax.named_scope("unembed"):
    w_DV = params["embed"].T if m.tie_embeddings else params["unembed"]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
    if params_lib.is_mup(m):  # µP's output multiplier 1/m (fmjax.nn.params)
      logits_BTV = logits_BTV * params_lib.logit_multiplier(m)
    logits_BTV = layers.softcap(logits_BTV, m.logit_softcap)  # Gemma 2: cap * tanh(x / cap)
    return constrain(logits_BTV, ("batch", "seq", "vocab"), rules)


def forward(params, tokens_BT, segment_ids_BT, positions_BT, spec) -> jax.Array:
  """Next-token logits (B, T, V) in float32."""
  x_BTD = embed(params, tokens_BT, spec)
  return unembed(params, decode(params, x_BTD, segment_ids_BT, positions_BT, spec), spec)


def update_without_gradient(params, new_params, stats, ok, spec):
  """Moves the parameters no gradient reaches, from a train step's statistics.

  That is the MoE router bias under aux-loss-free balancing (fmjax.nn.moe), kept
  as it was where `ok` is False (a skipped step). Returns the new parameters
  and metrics of them (the bias range) for the step's record.
  """
  if "moe_layers" not in params:
    return new_params, {}
  e = spec.model.moe
  bias_LE = params["moe_layers"]["router_bias"]
  if e.balance == "aux_free":
    moved_LE = moe.update_bias(bias_LE, stats["moe_load"], e.bias_update_rate)
    bias_LE = jnp.where(ok, moved_LE, bias_LE)
  new_params = dict(new_params, moe_layers=dict(new_params["moe_layers"], router_bias=bias_LE))
  return new_params, {"moe_bias_min": jnp.min(bias_LE), "moe_bias_max": jnp.max(bias_LE)}
