"""Hugging Face checkpoint directories: config.json, the weights and the tokenizer.

Files are read and written one tensor at a time (fmjax/hf/safetensors_files.py). Nothing is
dropped silently: a tensor no table row reads stops with a one-line `FormatError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
import sentencepiece as spm

from fmjax import config as config_lib
from fmjax.hf.config_map import MOE_FUNCTION, model_fields, to_hf_config
from fmjax.hf.layout import _lead, _slices, from_hf, hf_shape, to_hf
from fmjax.hf.safetensors_files import INDEX, WEIGHTS, DTYPES, FormatError, Reader, Writer, read_json
from fmjax.hf.tables import DERIVED, format_for, hf_names, tensor_table
from fmjax.nn import model as model_lib
from fmjax.nn.params import leaves_with_names


def is_hf_dir(path: str) -> bool:
  """A directory with HF weights, or whose config.json has a model_type (fmjax's has not)."""
  path = os.path.expanduser(path)
  if any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS, INDEX)):
    return True
  try:
    return "model_type" in read_json(os.path.join(path, "config.json"))
  except FormatError:
    return False


def read_config(directory: str) -> tuple[dict, dict]:
  """(HF config dict, fmjax model fields) of an HF directory."""
  where = os.path.join(directory, "config.json")
  hf_cfg = read_json(where)
  return hf_cfg, model_fields(hf_cfg, where)


def save(directory: str, m, seq_len: int, arrays: Iterator[tuple[str, np.ndarray]],
         max_shard_bytes: int = 2 << 30, dtype: str = "float32"):
  """Writes config.json and the weights of model `m` into `directory` (which exists).

  `arrays` yields (fmjax parameter name, its whole value) in the order of
  `tensor_table`; each is written out layer by layer before the next is drawn.
  """
  table = tensor_table(m, model_lib.param_decls(m))
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  specs = [(name, out_dtype, hf_shape(t, shape[_lead(t):]))
           for t, shape in table for name in hf_names(t, m)]
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(to_hf_config(m, seq_len, dtype), f, indent=2)
  writer = Writer(directory, specs, max_shard_bytes)
  for t, shape in table:
    name, x = next(arrays)
    assert name == t.param and x.shape == shape, (name, t.param, x.shape, shape)
    if name.endswith(".router_bias") and m.moe.balance != "aux_free":
      x = np.zeros_like(x)  # fmjax's selection does not use it; HF's always does
    for hf_name, idx in _slices(t, shape, m):
      writer.write(hf_name, to_hf(t, x[idx], m).astype(out_dtype, copy=False))
    del x  # before the next parameter is read
  writer.close()


def check(directory: str, m=None) -> tuple[dict, Reader, list]:
  """Checks an HF directory against its own config (or `m`) without reading weights.

  Returns (model fields, reader, tensor table). Raises FormatError naming the
  first problem: unreadable files, a config fmjax cannot hold, a model other
  than `m`, a missing tensor or one of another shape, a tensor no row reads.
  """
  directory = os.path.expanduser(directory)
  reader = Reader(directory)
  _, fields = read_config(directory)
  if m is not None:
    _check_same_model(directory, fields, m)
  else:
    m = config_lib.base().model
    m.update(fields)
  table = tensor_table(m, model_lib.param_decls(m))
  wanted = set()
  for t, shape in table:
    for name in hf_names(t, m):
      wanted.add(name)
      if name not in reader.entries:
        raise FormatError(f"{directory} has no tensor {name} (for fmjax's {t.param})")
      need = hf_shape(t, shape[_lead(t):])
      code = reader.entries[name][1]
      if code not in DTYPES:
        raise FormatError(f"tensor {name} in {directory} has dtype {code}; fmjax reads "
                          f"{', '.join(DTYPES)} (dequantize first)")
      if reader.shape(name) != need:
        raise FormatError(f"tensor {name} in {directory} has shape {list(reader.shape(name))} "
                          f"but its config.json needs {list(need)}")
  if m.tie_embeddings and "lm_head.weight" in reader.entries:
    wanted.add("lm_head.weight")  # allowed if it equals the embedding (checked when read)
  extra = sorted(n for n in reader.names() - wanted if not n.endswith(DERIVED))
  if extra:
    mtp = [n for n in extra if n.startswith(f"model.layers.{m.n_layers}.")]
    what = (f"multi-token prediction (MTP) modules ({mtp[0]}, ...) are not supported"
            if mtp else f"tensor {extra[0]}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}"
            f" has no place in fmjax's {format_for(m).model_type} model")
    raise FormatError(f"{directory}: {what}; nothing is dropped silently, so it was not "
                      "converted")
  return fields, reader, table


def _check_same_model(directory, fields, m):
  for name, value in _flat(fields):
    have = m[name]  # a ConfigDict reads "moe.balance" as m.moe.balance
    if have != value and name == "moe.dispatch":
      raise FormatError(f"model.moe.dispatch={have!r} drops tokens that transformers runs "
                        f"through the experts of {directory}; set model.moe.dispatch={value!r} "
                        f"(fmjax.hf.files.read_config({directory!r})[1] has it)")
    if have != value:
      raise FormatError(f"model.{name}={have!r} but the checkpoint in {directory} has "
                        f"{value!r}; set the model from fmjax.hf.files.read_config({directory!r})[1]")


def _flat(fields):
  for name, value in fields.items():
    if name == "rope_scaling":
      keys = {"none": ("kind",), "linear": ("kind", "factor")}.get(value["kind"], value.keys())
      for k in keys:
        yield f"rope_scaling.{k}", value[k]
    elif name == "moe":  # what the checkpoint's function depends on
      for k in (*MOE_FUNCTION, "balance") if value["balance"] == "aux_free" else MOE_FUNCTION:
        yield f"moe.{k}", value[k]
    elif name != "head_dim" or fields["attention"] == "gqa":
      yield name, value


def arrays(directory: str, m=None) -> Iterator[tuple[str, np.ndarray]]:
  """(fmjax parameter name, float32 value) of an HF directory, one parameter at a time."""
  fields, reader, table = check(directory, m)
  if m is None:
    m = config_lib.base().model
    m.update(fields)
  hf_cfg = read_json(os.path.join(os.path.expanduser(directory), "config.json"))
  interleaved = hf_cfg.get("rope_interleave", True)
  for t, shape in table:
    x = np.empty(shape, np.float32) if t.hf else np.zeros(shape, np.float32)  # not stored
    one = shape[_lead(t):]
    for name, idx in _slices(t, shape, m):
      y = from_hf(t, reader.get(name), one, m, interleaved)
      if not np.isfinite(y).all():
        raise FormatError(f"tensor {name} in {directory} has NaN or Inf values")
      x[idx] = y
    if t.param == "embed" and m.tie_embeddings and "lm_head.weight" in reader.entries:
      if not np.array_equal(reader.get("lm_head.weight").astype(np.float32), x):
        raise FormatError(f"{directory}: lm_head.weight differs from the embedding but "
                          "tie_word_embeddings is true; fmjax would drop it")
    yield t.param, x


def load_params(directory: str, m, abstract_params):
  """The parameters of an HF directory, sharded like `abstract_params` (for init_from)."""
  names = [n for n, _ in leaves_with_names(abstract_params)]
  targets = dict(zip(names, jax.tree.leaves(abstract_params)))
  values = {name: jax.make_array_from_callback(x.shape, targets[name].sharding, lambda i: x[i])
            for name, x in arrays(directory, m)}
  return jax.tree.unflatten(jax.tree.structure(abstract_params), [values[n] for n in names])


def write_tokenizer(directory: str, model_file: str):
  """The sentencepiece model beside the weights, as HF's Llama tokenizer reads it."""
  sp = spm.SentencePieceProcessor(model_file=model_file)
  shutil.copyfile(model_file, os.path.join(directory, "tokenizer.model"))
  ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(),
         "pad_token": sp.pad_id()}
  special = {k: sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True,
                   add_eos_token=False, legacy=False, add_prefix_space=False,
                   model_max_length=1 << 30), f, indent=2)
