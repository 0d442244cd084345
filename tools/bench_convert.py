"""Time and peak memory of `fmjax.convert` on a model of an experiment file, with random weights.

  python tools/bench_convert.py --config=experiments/bench_dense_1b.py --dir=/tmp/convert_1b
  python tools/bench_convert.py --hf=llama3_1b --dir=/tmp/convert_llama3   # import only
  python tools/bench_convert.py --hf=gemma3_1b --dir=/tmp/convert_gemma3   # import only

Writes DIR/run (an fmjax workdir holding one checkpoint of random float32
parameters, made one parameter at a time), then runs, each as its own
process, `to-hf` (DIR/run -> DIR/hf), `from-hf` (DIR/hf -> DIR/back) and
`to-hf` again (DIR/back -> DIR/hf2), and reports each one's wall time and peak
resident memory (the process's ru_maxrss), the model's size, and whether
DIR/hf2 is byte-identical to DIR/hf. Needs about 4x the model's float32
size on disk. Figures: tools/BENCHMARKS.md.

--hf=llama3_1b instead writes DIR/hf, a Hugging Face directory shaped like Llama 3.2 1B
(its config.json: 16 layers, width 2048, 32 query and 8 key/value heads, MLP 8192, a
128256-token vocabulary, tied embeddings, llama3 rope scaling; random bfloat16 weights,
written one tensor at a time), and times `from-hf` (DIR/hf -> DIR/back) alone;
--hf=gemma3_1b the same for google/gemma-3-1b-pt's shape (26 layers, 5 windowed to 1
full, a 262144-token vocabulary; 1.0B parameters). DIR is
removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config.json of meta-llama/Llama-3.2-1B, as published (the shape; the weights are random).
LLAMA3_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
# config.json of google/gemma-3-1b-pt, as published (the shape; the weights are random):
# 26 layers, five windowed (512) to one full, one key/value head of 256, vocab 262144.
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
HF_SHAPES = {"llama3_1b": LLAMA3_1B, "gemma3_1b": GEMMA3_1B}


def make_hf_dir(name: str, directory: str, seed: int = 0) -> int:
  """An HF directory of random bfloat16 weights shaped like `name`; returns their number."""
  # Imported here, in the child: the parent must stay small (see `timed`).
  import ml_dtypes
  import numpy as np

  from fmjax.hf import config_map, layout, tables
  from fmjax.hf.safetensors_files import Writer
  from fmjax import config as config_lib
  from fmjax.nn import model

  hf_cfg = HF_SHAPES[name]
  m = config_lib.base().model
  m.update(config_map.model_fields(hf_cfg))
  table = tables.tensor_table(m, model.param_decls(m))
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = [(n, bf16, layout.hf_shape(t, shape[layout._lead(t):]))
           for t, shape in table for n in tables.hf_names(t, m)]
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  rng = np.random.default_rng(seed)
  writer = Writer(directory, specs, 5 << 30)  # one file, as the published checkpoint
  for n, _, shape in specs:
    x = rng.standard_normal(shape, dtype=np.float32) * 0.02
    writer.write(n, (x + 1 if "norm" in n else x).astype(bf16))
  writer.close()
  return sum(math.prod(s[2]) for s in specs)


def make_workdir(config_file: str, workdir: str, seed: int = 0) -> int:
  """A workdir with random parameters of the experiment's model; returns their number."""
  import importlib.util

  import jax
  import numpy as np

  from fmjax.train import checkpoint
  from fmjax import config as config_lib
  from fmjax.nn import model
  from fmjax.scaling import sizing
  from fmjax.nn.params import Param, ones

  spec = importlib.util.spec_from_file_location("experiment", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = sizing.resolve(module.get_config())
  rng = np.random.default_rng(seed)

  def draw(p: Param):
    x = rng.standard_normal(p.shape, dtype=np.float32)
    x *= 0.02
    return jax.device_put(x + 1 if p.init is ones else x, jax.devices("cpu")[0])

  params = jax.tree.map(draw, model.param_decls(cfg.model),
                                      is_leaf=lambda x: isinstance(x, Param))
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1,
                               async_save=False,
                               save_gb_in_flight=math.ceil(max(x.nbytes for x in
                                                               jax.tree.leaves(params)) / 1e9)) as ckpt:
    ckpt.save(0, {"params": params})
  return sum(x.size for x in jax.tree.leaves(params))


def timed(args: list[str]) -> dict:
  """Runs `python ARGS` from this small process; its wall and CPU (user + system) time (s)
  and peak RSS (GiB).

  The parent must stay small: a child's ru_maxrss counts the parent's memory it
  was forked with.
  """
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, *args], env=env)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(args)} failed")
  return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
          "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/bench_dense_1b.py")
  parser.add_argument("--dir", required=True, help="a new directory for the checkpoints")
  parser.add_argument("--max_shard_gb", default="2")
  parser.add_argument("--hf", choices=sorted(HF_SHAPES), help="time from-hf on this shape")
  parser.add_argument("--keep", action="store_true", help="keep --dir (with --hf)")
  parser.add_argument("--make_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  d = os.path.abspath(args.dir)
  if args.make_only:  # in a child process, so that the parent stays small
    with open(os.path.join(d, "params.json"), "w") as f:
      json.dump(make_hf_dir(args.hf, os.path.join(d, "hf")) if args.hf else
                make_workdir(args.config, os.path.join(d, "run")), f)
    return
  if os.path.exists(d):
    raise SystemExit(f"--dir={d} exists; give a new directory")
  os.makedirs(d)
  if args.hf:
    try:
      print(json.dumps(_import_only(args.hf, d), indent=1))
    finally:
      if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return
  convert = ["-m", "fmjax.convert"]
  shard = f"--max_shard_gb={args.max_shard_gb}"
  out = {"config": args.config,
         "make_random_workdir": timed([__file__, f"--config={args.config}", f"--dir={d}",
                                       "--make_only"])}
  with open(os.path.join(d, "params.json")) as f:
    n = json.load(f)
  out.update(params=n, float32_gib=round(4 * n / 2**30, 2))
  out["to_hf"] = timed(convert + ["to-hf", f"--workdir={d}/run", f"--out={d}/hf",
                                  "--tokenizer=none", shard])
  out["from_hf"] = timed(convert + ["from-hf", f"--hf={d}/hf", f"--out={d}/back"])
  out["to_hf_again"] = timed(convert + ["to-hf", f"--workdir={d}/back", f"--out={d}/hf2",
                                        "--tokenizer=none", shard])
  names = sorted(os.listdir(f"{d}/hf"))
  out["hf_files"] = names
  out["round_trip_identical"] = (names == sorted(os.listdir(f"{d}/hf2")) and not any(
      filecmp.cmpfiles(f"{d}/hf", f"{d}/hf2", names, shallow=False)[1:]))
  out["load_average_1min_at_end"] = os.getloadavg()[0]
  print(json.dumps(out, indent=1))


def _import_only(name: str, d: str) -> dict:
  out = {"shape": name, "make_random_hf_dir": timed([__file__, f"--hf={name}", f"--dir={d}",
                                                     "--make_only"])}
  with open(os.path.join(d, "params.json")) as f:
    n = json.load(f)
  out.update(params=n, bfloat16_gib=round(2 * n / 2**30, 2), float32_gib=round(4 * n / 2**30, 2))
  out["from_hf"] = timed(["-m", "fmjax.convert", "from-hf", f"--hf={d}/hf", f"--out={d}/back"])
  out["load_average_1min_at_end"] = os.getloadavg()[0]
  return out


if __name__ == "__main__":
  main()
