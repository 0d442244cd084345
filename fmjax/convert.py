"""Converts checkpoints between fmjax and Hugging Face (the formats are in fmjax/hf/).

  python -m fmjax.convert to-hf --workdir=DIR [--step=N] --out=HF_DIR \\
      [--dtype=float32|bfloat16] [--max_shard_gb=2] [--tokenizer=auto|none|FILE]
  python -m fmjax.convert from-hf --hf=HF_DIR --out=DIR

to-hf writes config.json, the weights (model.safetensors, or shards with
model.safetensors.index.json) and the run's sentencepiece tokenizer
(tokenizer.model, tokenizer_config.json). Grouped-query models become
LlamaForCausalLM, MLA models DeepseekV3ForCausalLM.

from-hf writes an fmjax directory: config.json (the model fields of the HF
config on fmjax's defaults; data.tokenizer_path names the HF directory's
tokenizer.model, copied beside it) and checkpoints/0 holding the parameters.
Start a run from it with `checkpoint.init_from=DIR` (or give the HF directory
itself), or sample from it with `python -m fmjax.sample --workdir=DIR`.

Both read one parameter at a time and write it before reading the next: an
export holds one stacked parameter in memory, an import the model once (the
checkpoint is written whole). The output appears only when complete (it is
written to a temporary directory and renamed). Exit status 0; 1 for what it
cannot read or write, 2 for a bad command line; either with one line starting
'fmjax:'.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax import config as config_lib
from fmjax import errors
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.hf import config_map, files as hf, tables
from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import model as model_lib
from fmjax.nn.params import leaves_with_names
from fmjax.train import checkpoint as checkpoint_lib


def load_workdir_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FormatError(f"no config.json in --workdir={workdir}; give a training run's workdir")
  cfg = config_lib.base()  # fields newer than the run keep their defaults
  try:
    with open(path) as f:
      cfg.update(json.load(f))
  except (OSError, ValueError) as e:
    raise FormatError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
  return cfg


def workdir_arrays(workdir: str, step: int | None, m):
  """(checkpoint step, iterator of (parameter name, numpy value)) read one at a time."""
  directory, latest = checkpoint_lib.latest_checkpoint(workdir)
  step = latest if step is None else step
  ckpt = checkpoint_lib.Checkpointer(directory, keep=1 << 30)
  if step not in ckpt.all_steps():
    raise FormatError(f"no checkpoint {step} in {directory} (it has {ckpt.all_steps()})")
  problem = ckpt.verify(step)
  if problem:
    raise FormatError(f"checkpoint {step} in {directory} is damaged: {problem}")
  decls = dict(leaves_with_names(model_lib.param_decls(m)))

  def read():
    for t, shape in tables.tensor_table(m, model_lib.param_decls(m)):
      target = _nest({}, t.param, np.zeros((), decls[t.param].dtype))  # only its structure is used
      args = _nest({}, t.param, ocp.RestoreArgs(restore_type=np.ndarray))
      out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          {"params": target}, restore_args={"params": args}, partial_restore=True)))
      x = functools.reduce(lambda node, p: node[p], t.param.split("."), out["state"]["params"])
      if x.shape != shape:
        raise FormatError(f"checkpoint {step} has shape {x.shape} for {t.param} but "
                          f"config.json needs {shape}")
      yield t.param, x
      del out, x  # before the next parameter is read
    ckpt.close()

  return step, read()


def tokenizer_file(cfg, choice: str) -> str | None:
  if choice == "none":
    return None
  path = choice if choice != "auto" else (cfg.data.tokenizer_path or tokenizer_lib.model_path(
      cfg.data.data_dir, cfg.model.vocab_size, cfg.data.tokenizer))
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FormatError(f"the run's tokenizer {path} does not exist; pass "
                      "--tokenizer=FILE, or --tokenizer=none to export without one")
  return path


def _nest(tree: dict, name: str, value) -> dict:
  """`tree` with `value` at dotted `name` ('layers.wq': tree['layers']['wq'])."""
  *parents, leaf = name.split(".")
  functools.reduce(lambda node, p: node.setdefault(p, {}), parents, tree)[leaf] = value
  return tree


@contextlib.contextmanager
def _fresh(out: str):
  """A temporary directory beside `out` (which must not exist or be empty), renamed to
  `out` when the block completes and removed if it fails."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FormatError(f"--out={out} exists and is not empty; choose a new directory")
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out):
    os.rmdir(out)
  os.replace(tmp, out)


def to_hf(workdir: str, out: str, step: int | None = None, dtype: str = "float32",
          max_shard_bytes: int = 2 << 30, tokenizer: str = "auto") -> int:
  """Exports checkpoint `step` (default: the latest) of `workdir`; returns the step."""
  cfg = load_workdir_config(workdir)
  config_map.check_model(cfg.model)
  token_file = tokenizer_file(cfg, tokenizer)
  try:
    step, arrays = workdir_arrays(workdir, step, cfg.model)
  except FileNotFoundError as e:
    raise FormatError(str(e)) from None
  with _fresh(out) as tmp:
    hf.save(tmp, cfg.model, cfg.data.seq_len, arrays, max_shard_bytes, dtype)
    if token_file:
      hf.write_tokenizer(tmp, token_file)
  return step


def from_hf(hf_dir: str, out: str):
  """Imports an HF directory as an fmjax directory with one checkpoint (step 0)."""
  hf_dir = os.path.expanduser(hf_dir)
  fields, _, _ = hf.check(hf_dir)  # every problem is found before anything is written
  cfg = config_lib.base()
  cfg.model.update(fields)
  hf_cfg, _ = hf.read_config(hf_dir)
  if hf_cfg.get("max_position_embeddings"):  # the length it was trained at, as a start
    cfg.data.seq_len = int(hf_cfg["max_position_embeddings"])
  final = os.path.abspath(os.path.expanduser(out))
  with _fresh(out) as tmp:
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
      shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
      cfg.data.tokenizer_path = os.path.join(final, "tokenizer.model")
    params = {}
    for name, x in hf.arrays(hf_dir, cfg.model):
      _nest(params, name, jax.device_put(x, jax.devices("cpu")[0]))  # no copy on the host
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    # the model once in memory, plus orbax's copies of about one parameter for writing
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    with checkpoint_lib.Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False,
                                     save_gb_in_flight=math.ceil(largest / 1e9)) as ckpt:
      ckpt.save(0, {"params": params})


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  parser = errors.ArgumentParser(prog="python -m fmjax.convert",
                                 description=errors.command_help(__doc__))
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to-hf", help="fmjax workdir -> Hugging Face directory",
                     description="fmjax workdir -> Hugging Face directory")
  a.add_argument("--workdir", required=True, help="the workdir of a training run")
  a.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  a.add_argument("--out", required=True, help="a new directory for the Hugging Face files")
  a.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of the written weights (default float32)")
  a.add_argument("--max_shard_gb", type=float, default=2.0,
                 help="largest safetensors file, > 0; more weights are split with an index")
  a.add_argument("--tokenizer", default="auto",
                 help="auto (the run's), none, or a sentencepiece .model file")
  b = sub.add_parser("from-hf", help="Hugging Face directory -> fmjax directory",
                     description="Hugging Face directory -> fmjax directory")
  b.add_argument("--hf", required=True, help="a Hugging Face model directory")
  b.add_argument("--out", required=True, help="a new directory for the fmjax checkpoint")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "to-hf":
    if args.step is not None and args.step < 0:
      a.error(f"--step={args.step} must be >= 0")
    if not args.max_shard_gb > 0:
      a.error(f"--max_shard_gb={args.max_shard_gb} must be > 0")

  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion runs on the host
  started = time.perf_counter()
  try:
    if args.command == "to-hf":
      step = to_hf(args.workdir, args.out, args.step, args.dtype,
                   int(args.max_shard_gb * (1 << 30)), args.tokenizer)
      print(f"wrote {args.out} from checkpoint {step} of {args.workdir} "
            f"in {time.perf_counter() - started:.1f} s")
    else:
      from_hf(args.hf, args.out)
      print(f"wrote {args.out} from {args.hf} in {time.perf_counter() - started:.1f} s")
  except (FormatError, checkpoint_lib.NonFiniteCheckpoint) as e:
    raise errors.Failure(str(e)) from None
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
