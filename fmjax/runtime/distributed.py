"""Several processes, one run: jax's multi-controller runtime, and which rows each host reads.

Every host (a TPU VM worker, a GPU host, or one of `fmjax.launch_local`'s
processes) runs the same command. `initialize` connects the processes before
jax starts its backends:

- explicitly, from --coordinator_address, --num_processes and --process_id, or
  from the environment variables FMJAX_COORDINATOR_ADDRESS,
  FMJAX_NUM_PROCESSES and FMJAX_PROCESS_ID (flags win);
- automatically on a Cloud TPU VM, where jax finds the slice's workers itself;
- not at all otherwise: one process, as before.

Between CPU processes, collectives go through gloo (jax's CPU default once
the runtime is up). jax's own preemption service is turned off: SIGTERM is
fmjax.train.preemption's, which works the same with one process or many.

`host_rows` says which rows of a global batch this process feeds, from the
batch sharding: the data pipeline reads exactly those; `global_batch` makes
the global arrays of those rows.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from fmjax.errors import ConfigError

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, for a run of several "
    "processes (default: $FMJAX_COORDINATOR_ADDRESS; found automatically on TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes take part (default: $FMJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 to num_processes - 1 (default: "
    "$FMJAX_PROCESS_ID).")

ENV = ("FMJAX_COORDINATOR_ADDRESS", "FMJAX_NUM_PROCESSES", "FMJAX_PROCESS_ID")


def settings(environ=os.environ) -> tuple[str | None, int | None, int | None]:
  """(coordinator address, number of processes, process id) from the flags or environment."""
  def flag(holder):
    return holder.value if flags.FLAGS.is_parsed() else None

  address = flag(_COORDINATOR) or environ.get(ENV[0]) or None
  count, index = flag(_NUM_PROCESSES), flag(_PROCESS_ID)
  try:
    count = count if count is not None else _int_or_none(environ.get(ENV[1]))
    index = index if index is not None else _int_or_none(environ.get(ENV[2]))
  except ValueError as e:
    raise ConfigError(f"{ENV[1]} and {ENV[2]} must be integers: {e}") from None
  return address, count, index


def _int_or_none(text):
  return int(text) if text not in (None, "") else None


def initialize(platform: str, environ=os.environ) -> None:
  """Joins the run's processes; call it before jax starts its backends.

  Raises ConfigError for settings that are incomplete or inconsistent.
  """
  import jax  # here, not at the top: see global_batch

  address, count, index = settings(environ)
  given = [v is not None for v in (address, count, index)]
  if any(given) and not all(given):
    raise ConfigError(
        "a run of several processes needs all of --coordinator_address, --num_processes and "
        f"--process_id (or {', '.join(ENV)}); got address={address}, num_processes={count}, "
        f"process_id={index}")
  if all(given) and not (count >= 1 and 0 <= index < count):
    raise ConfigError(f"--process_id={index} must be in [0, --num_processes={count})")
  jax.config.update("jax_enable_preemption_service", False)  # SIGTERM is fmjax.train.preemption's
  if all(given):
    if count > 1:
      jax.distributed.initialize(address, count, index)
  elif platform == "tpu":
    try:  # the workers of a TPU slice, from the VM's metadata
      jax.distributed.initialize()
    except ValueError:  # a TPU outside a Cloud TPU VM (no cluster found): one process
      pass


def wait_for_all(name: str) -> None:
  """Blocks until every process gets here (a barrier of the coordination service, not a collective).

  Before the first step: gloo connects CPU processes at their first collective
  with a fixed, short timeout, so a process that starts late (process 0 alone
  opens TensorBoard, for one) must not be met there. `name` must be new each time.
  """
  import jax  # here, not at the top: see global_batch
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # only with several processes: slow to import
    multihost.sync_global_processes(name)


def host_rows(batch_sharding, batch_size: int) -> tuple[int, int]:
  """[start, stop): the rows of a (batch_size, ...) global batch held by this process's devices.

  Raises ConfigError if they are not one contiguous block (then no per-host
  data pipeline could feed them).
  """
  import jax  # here, not at the top: see global_batch

  covered = set()
  for device, index in batch_sharding.devices_indices_map((batch_size, 1)).items():
    if device.process_index == jax.process_index():
      covered.update(range(batch_size)[index[0]])
  start, stop = min(covered), max(covered) + 1
  if covered != set(range(start, stop)):
    raise ConfigError(
        f"process {jax.process_index()} holds rows that are not one contiguous block of the "
        "batch; order the mesh so that sharding.activations.batch splits the batch over the "
        "processes first (mesh.data or mesh.fsdp a multiple of the process count)")
  return start, stop


def global_batch(local_batch: dict, sharding) -> dict:
  """Host-local numpy rows -> one global array per key, sharded over the batch axes."""
  # jax is imported inside functions here: every command imports this module (for its
  # flags) before host_malloc may restart the process, and importing jax takes a while.
  import jax

  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
