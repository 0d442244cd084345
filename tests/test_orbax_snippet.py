"""The README's snippet restores a trained run's parameters with plain orbax, without fmjax.

The snippet is read from README.md and run as it is written, in a fresh process
with one device, against a checkpoint that a tiny fmjax run wrote on 8; what it
restores is compared with fmjax's own restore of the same checkpoint.
"""

import os
import pickle
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np

from conftest import tiny_config
from fmjax.nn import sharding
from fmjax.train import checkpoint, loop, state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join("runs", "pretrain_tiny")  # the path the snippet names


def readme_snippet() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  found = [b for b in blocks if "import orbax.checkpoint" in b]
  assert len(found) == 1, f"{len(found)} orbax snippets in README.md"
  return found[0]


def test_the_readme_snippet_restores_a_run_without_fmjax(tmp_path, data_dir):
  snippet = readme_snippet()
  assert f"{WORKDIR}/checkpoints" in snippet
  assert not re.search(r"^\s*(import|from)\s+fmjax\b", snippet, re.M)

  cfg = tiny_config(vocab_size=512)
  cfg.data.update(data_dir=data_dir, mixture="synthetic", eval_batches=1)
  cfg.train.update(steps=2, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  cfg.checkpoint.update(every=1, keep=2)  # checkpoints 1 and 2: the snippet picks the latest
  workdir = str(tmp_path / WORKDIR)
  loop.run(cfg, workdir)

  out = tmp_path / "restored.pkl"
  check = textwrap.dedent(f"""
      import pickle, sys
      assert not [m for m in sys.modules if m.split(".")[0] == "fmjax"], "the snippet used fmjax"
      with open({str(out)!r}, "wb") as f:
        pickle.dump((step, params), f)
      """)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  r = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path,
                     env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  with open(out, "rb") as f:
    step, params = pickle.load(f)

  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2) as ckpt:
    assert ckpt.all_steps() == [1, 2] and step == 2
    want = jax.device_get(ckpt.restore(step, s.abstract_state)["params"])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, ref)
