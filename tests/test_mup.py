"""µP (model.parametrization='mup'): multipliers by hand, the optimizer's steps, the coordinate check."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from fmjax import config as config_lib
from fmjax.hf import config_map
from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import model
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec
from fmjax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _coord_check():
  spec = importlib.util.spec_from_file_location("coord_check",
                                                os.path.join(ROOT, "tools", "coord_check.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def mup_config(**model_fields):
  # d_model 64 over a base width of 16: m = 4; 2 layers; head dim 16.
  c = tiny_config(**dict(dict(d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=128,
                              parametrization="mup", mup_base_width=16), **model_fields))
  return c


# (init std, learning-rate multiplier) by hand, for m = 4, init_std 0.02, 2 layers:
# hidden weights std 0.02 / sqrt(4), output projections also / sqrt(2 * 2 layers);
# hidden lr 1/4; the router (a readout to a finite number of experts) std and lr / 4;
# embedding and unembedding unchanged (the logits take the 1/4 instead); norms unchanged.
STD, OUT = 0.02, 0.02 / math.sqrt(4)
DENSE = {
    "embed": (STD, 1.0), "unembed": (STD, 1.0), "final_norm": (None, 1.0),
    "layers.attn_norm": (None, 1.0), "layers.mlp_norm": (None, 1.0),
    "layers.wq": (STD / 2, 0.25), "layers.wk": (STD / 2, 0.25), "layers.wv": (STD / 2, 0.25),
    "layers.wo": (OUT / 2, 0.25), "layers.w_gate": (STD / 2, 0.25),
    "layers.w_up": (STD / 2, 0.25), "layers.w_down": (OUT / 2, 0.25),
}
MOE_MLA = {
    "embed": (STD, 1.0), "unembed": (STD, 1.0), "final_norm": (None, 1.0),
    "moe_layers.attn_norm": (None, 1.0), "moe_layers.mlp_norm": (None, 1.0),
    "moe_layers.wq_a": (STD / 2, 0.25), "moe_layers.q_norm": (None, 1.0),
    "moe_layers.wq_b": (STD / 2, 0.25), "moe_layers.wkv_a": (STD / 2, 0.25),
    "moe_layers.kv_norm": (None, 1.0), "moe_layers.wkv_b": (STD / 2, 0.25),
    "moe_layers.wo": (OUT / 2, 0.25),
    "moe_layers.router": (STD / 4, 0.25), "moe_layers.router_bias": (None, 1.0),
    "moe_layers.w_gate": (STD / 2, 0.25), "moe_layers.w_up": (STD / 2, 0.25),
    "moe_layers.w_down": (OUT / 2, 0.25),
}


@pytest.mark.parametrize("fields,expected", [
    ({}, DENSE),
    (dict(attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
          qk_rope_head_dim=16, v_head_dim=16, moe=dict(n_routed_experts=4, experts_per_token=2,
                                                       moe_intermediate_size=32)), MOE_MLA),
], ids=["dense_gqa", "moe_mla"])
def test_multipliers_match_hand_derived_values(fields, expected):
  c = mup_config()
  c.model.update(fields)
  decls = model.param_decls(c.model)
  named = dict(params_lib.leaves_with_names(decls))
  assert set(named) == set(expected)
  for name, (std, lr) in expected.items():
    p = named[name]
    assert p.lr_scale == pytest.approx(lr), name
    if std is not None:
      drawn = np.asarray(p.init(jax.random.key(0), p.shape, p.dtype))
      assert float(np.std(drawn)) == pytest.approx(std, rel=0.1), name
  assert params_lib.logit_multiplier(c.model) == 0.25
  assert params_lib.attention_scale(c.model, 16) == 1 / 16


def test_sp_keeps_the_declarations():
  c = tiny_config()
  decls = model.param_decls(c.model)
  assert all(p.lr_scale == 1.0 for _, p in params_lib.leaves_with_names(decls))
  assert params_lib.logit_multiplier(c.model) == 1.0
  assert params_lib.attention_scale(c.model, 16) == 0.25
  # The optimizer is plain clipped AdamW: no per-parameter transform in its state.
  o = c.optimizer
  plain = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.adamw(
      optim.schedule(o, 10), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      mask=optim.decay_mask(decls)))
  abstract = params_lib.abstract(decls)
  assert (jax.tree.structure(jax.eval_shape(optim.make(o, 10, decls).init, abstract)) ==
          jax.tree.structure(jax.eval_shape(plain.init, abstract)))


def test_the_first_adam_step_moves_each_weight_by_lr_times_its_multiplier():
  # Adam's first update is lr * g / (|g| + eps) = lr * sign(g): each weight moves
  # by exactly its learning rate, so the step shows the multipliers directly.
  c = mup_config()
  c.optimizer.update(lr=1e-2, weight_decay=0.0, clip_norm=0.0, schedule="constant", eps=1e-12)
  decls = model.param_decls(c.model)
  spec = ModelSpec.from_config(c)
  params = jax.jit(lambda k: params_lib.init(decls, k))(jax.random.key(0))
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 9), 0, c.model.vocab_size)

  def loss(p):
    ones = jnp.ones((2, 8), jnp.int32)
    logits = model.forward(p, tokens_BT[:, :-1], ones, jnp.cumsum(ones, 1) - 1, spec)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BT[:, 1:, None], -1))

  tx = optim.make(c.optimizer, 10, decls)
  updates, _ = jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p))(params)
  named = params_lib.leaves_with_names(decls)
  by_name = dict(zip([n for n, _ in named], jax.tree.leaves(updates)))
  for name, p in named:
    u = np.abs(np.asarray(by_name[name]))
    moved = u[u > 0]  # (a few gradients are so small that eps still counts)
    assert np.mean(np.isclose(moved, 1e-2 * p.lr_scale, rtol=1e-3)) > 0.9, name


@pytest.fixture(scope="module")
def coordinates():
  cc = _coord_check()
  widths = (16, 32, 64)
  kw = dict(base_width=16, steps=3, lr=1e-2, n_layers=1, batch=4, seq=16)
  return cc, {name: cc.check(widths, name, **kw) for name in ("sp", "mup")}


def test_coordinate_check_is_flat_under_mup_and_drifts_under_sp(coordinates):
  cc, results = coordinates
  sp, mup = cc.slopes(results["sp"]), cc.slopes(results["mup"])
  inner = ("attention", "mlp", "hidden", "logits")
  # Slopes of log RMS against log width after 2 Adam steps. Under SP every
  # inner activation grows with width (measured: attention 0.77, MLP 1.7, hidden
  # 0.42, logits 0.95); under µP none grows, and what is left (measured: at most
  # -0.42, the MLP's, shrinking at larger widths; tools/coord_check.py) is a
  # finite-width effect.
  assert sp["mlp"] > 1.0, sp
  assert all(sp[k] > 0.3 for k in inner), sp
  assert max(abs(mup[k]) for k in inner) < 0.6, mup
  assert sum(abs(mup[k]) for k in inner) < 0.35 * sum(abs(sp[k]) for k in inner), (sp, mup)


def test_a_mup_model_is_refused_by_the_hugging_face_export():
  # transformers has no 1/m logit multiplier nor 1/d_head attention scale: exporting would
  # change the model's outputs, so the converter says so instead.
  m = config_lib.base().model
  m.parametrization = "mup"
  with pytest.raises(FormatError, match=r"model.parametrization='mup' has no place in the llama"):
    config_map.check_model(m)
