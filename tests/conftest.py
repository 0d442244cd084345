"""Every test sees 8 fake CPU devices; the flag must be set before jax starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the command lines the
# tests start: the same tiny programs are compiled by many tests and subprocesses.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit, shutil, tempfile  # noqa: E401
  _cache = tempfile.mkdtemp(prefix="fmjax_test_jax_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

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


DATA_VOCAB = 512  # the tokenizer size tests share, so the suite trains one tokenizer


@pytest.fixture(scope="session")
def tok(data_dir):
  from fmjax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.load_or_train(data_dir, DATA_VOCAB)


def data_cfg(data_dir, **fields):
  """The data section of the base config on `data_dir`, seq_len 32 unless given."""
  d = config_lib.base().data
  d.update(dict(dict(data_dir=data_dir, seq_len=32), **fields))
  return d


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  import numpy as np
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def tree_hash(path) -> str:
  """Every file's relative path and bytes under `path` ('missing' if it does not exist)."""
  import hashlib
  if not os.path.exists(path):
    return "missing"
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      file = os.path.join(root, name)
      h.update(os.path.relpath(file, path).encode() + b"\0")
      with open(file, "rb") as f:
        h.update(f.read())
  return h.hexdigest()
