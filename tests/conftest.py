"""Every test sees 8 fake CPU devices; the flag must be set before jax starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from fmjax import config as config_lib  # noqa: E402


def tiny_config(**model):
  """A model small enough to compile in seconds, on the default mesh rules."""
  c = config_lib.base()
  c.model.update(dict(dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=128), **model))
  c.data.seq_len = 32
  c.train.batch_size = 8
  c.optimizer.update(warmup_steps=0, lr=1e-3)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One built corpus and tokenizer shared by every test that needs real data."""
  return str(tmp_path_factory.mktemp("fmjax_data"))
