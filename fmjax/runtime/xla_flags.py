"""XLA flags fmjax sets for CPUs, GPUs and TPUs: the one place they live.

`apply()` runs at start-up in every fmjax command (`fmjax.runtime.cli.start_jax`),
before jax creates its backends. It adds flags only for the platform this
process will use, found from `JAX_PLATFORMS` or else from the installed jax
plugins. A flag already set in `XLA_FLAGS` or `LIBTPU_INIT_ARGS` is left as
the user set it, and `FMJAX_XLA_FLAGS=0` turns all of this off.

CPU:
- `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions): XLA's
  own dot thunks instead. YNNPACK is faster on one large square matmul, but
  around the train step's matmuls it adds a transposing copy of an operand for
  most of them (weight gradients contract over rows); measured on the
  20M-parameter float32 benchmark, the step takes 6-17% less CPU time and 7%
  less wall time without it (tools/BENCHMARKS.md).

GPU: none. A flag is kept only if it measures faster than XLA's defaults;
tools/bench_gpu.py measures each candidate. On an NVIDIA H200 (jax 0.11.2),
XLA's default GPU flags ran the 1B dense benchmark
(experiments/bench_dense_1b.py) at 253 ms a step, against 274 ms with the
three flags fmjax used to set (`GPU_CANDIDATES`): about 8% faster, so none
is set. `GPU_CANDIDATES` keeps them for measuring one at a time.

TPU (read by libtpu from `LIBTPU_INIT_ARGS`): asynchronous collective fusion
and overlap of collectives with compute, as MaxText sets them. Not yet
measured by fmjax (no TPU was available): `python -m fmjax.bench` with and
without `FMJAX_XLA_FLAGS=0` measures them against libtpu's defaults.
"""

from __future__ import annotations

import importlib.metadata
import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
GPU_FLAGS = ()
# Measured together slower than XLA's defaults; each still to be measured alone.
GPU_CANDIDATES = (
    # Schedules collectives (FSDP all-gathers, gradient reduce-scatters) to overlap with compute.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # cuBLAS for matmuls, not Triton GEMMs.
    "--xla_gpu_enable_triton_gemm=false",
    # Collectives on a high-priority stream, so compute kernels do not starve them.
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
TPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
# platform -> (the environment variable its flags are read from, the flags)
_SETTINGS = {"cpu": ("XLA_FLAGS", CPU_FLAGS), "gpu": ("XLA_FLAGS", GPU_FLAGS),
             "tpu": ("LIBTPU_INIT_ARGS", TPU_FLAGS)}


def platform() -> str:
  """'gpu', 'tpu' or 'cpu': the backend jax will pick, found without starting it."""
  chosen = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if chosen:
    return {"cuda": "gpu", "rocm": "gpu"}.get(chosen, chosen)
  names = {d.metadata["Name"].lower().replace("_", "-")
           for d in importlib.metadata.distributions() if d.metadata["Name"]}
  if any(n.startswith(("jax-cuda", "jax-rocm")) for n in names):
    return "gpu"
  if "libtpu" in names or "libtpu-nightly" in names:
    return "tpu"
  return "cpu"


def _merge(existing: str, extra) -> str:
  """`existing` plus each flag of `extra` whose name it does not set already."""
  have = {f.split("=")[0] for f in existing.split()}
  added = [f for f in extra if f.split("=")[0] not in have]
  return " ".join([existing.strip(), *added]).strip()


def apply(environ=os.environ) -> str:
  """Sets the flags for this process's accelerator; returns the platform found."""
  kind = platform()
  var, extra = _SETTINGS.get(kind, (None, ()))
  if environ.get("FMJAX_XLA_FLAGS", "1") != "0" and extra:
    environ[var] = _merge(environ.get(var, ""), extra)
  return kind
