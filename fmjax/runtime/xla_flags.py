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

GPU (read by XLA from `XLA_FLAGS`):
- `--xla_gpu_enable_latency_hiding_scheduler`: schedules collectives
  (FSDP all-gathers, gradient reduce-scatters) to overlap with compute.
- `--xla_gpu_enable_triton_gemm=false`: cuBLAS for matmuls, not Triton GEMMs.
- `--xla_gpu_enable_highest_priority_async_stream`: collectives on a
  high-priority stream so they are not starved by compute kernels.

TPU (read by libtpu from `LIBTPU_INIT_ARGS`): asynchronous collective fusion
and overlap of collectives with compute, as MaxText sets them.

None of these was measured by fmjax yet (no accelerator was available); see
tools/BENCHMARKS.md for the command that measures them.
"""

from __future__ import annotations

import importlib.metadata
import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
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
  if environ.get("FMJAX_XLA_FLAGS", "1") != "0" and kind in _SETTINGS:
    var, extra = _SETTINGS[kind]
    environ[var] = _merge(environ.get(var, ""), extra)
  return kind
