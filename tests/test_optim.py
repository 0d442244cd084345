"""Learning-rate schedules and optimizer choices against their closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.nn import model
from fmjax.train import optim


def opt_cfg(**kw):
  c = tiny_config().optimizer
  c.update(dict(dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), **kw))
  return c


def test_cosine_warms_up_then_decays_to_the_floor():
  lr = optim.schedule(opt_cfg(schedule="cosine"), train_steps=110)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_linearly():
  lr = optim.schedule(opt_cfg(schedule="wsd", wsd_decay_fraction=0.2), train_steps=110)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(89)) == pytest.approx(1.0)  # decay covers the last 20 of 100 steps
  assert float(lr(100)) == pytest.approx(0.55)
  assert float(lr(110)) == pytest.approx(0.1)


def test_decay_steps_sets_the_schedule_length_independently_of_train_steps():
  a = optim.schedule(opt_cfg(decay_steps=200), train_steps=50)
  b = optim.schedule(opt_cfg(decay_steps=200), train_steps=200)
  assert [float(a(i)) for i in range(50)] == [float(b(i)) for i in range(50)]


def test_weight_decay_skips_norm_scales():
  mask = optim.decay_mask(model.param_decls(tiny_config().model))
  assert mask["layers"]["wq"] and mask["embed"]
  assert not mask["layers"]["attn_norm"] and not mask["final_norm"]


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_optimizers_descend_a_quadratic(name):
  decls = {"w": model.Param((4, 4), ("embed", "mlp"), lambda k, s, d: jnp.ones(s, d))}
  o = opt_cfg(name=name, lr=0.02, warmup_steps=0, schedule="constant", weight_decay=0.0)
  tx = optim.make(o, 100, decls)
  params = {"w": jnp.ones((4, 4))}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  for _ in range(40):  # each step moves w by about lr: 1 -> ~0.2
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert float(loss(params)) < 0.1 * 16
  assert np.isfinite(float(loss(params)))
