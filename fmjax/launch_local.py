"""Several fmjax processes on this machine, as one multi-process run: what a pod does, on a CPU.

  python -m fmjax.launch_local --processes=2 --devices-per-process=4 -- \\
      --config=experiments/pretrain_tiny.py --workdir=runs/two_hosts

starts N copies of `python -m fmjax.main ARGS` (or --module), each with its
own `--devices-per-process` fake CPU devices (appended as
--config.mesh.cpu_devices), joined by jax's distributed runtime through a
coordinator on a free local port (fmjax.runtime.distributed; CPU collectives go
through gloo). Each line of their output is prefixed with the process index.

If a process dies (any non-zero exit or a signal), the others are killed at
once (they would wait on it in a collective until a timeout) and the launcher
exits with that status (128 + the signal's number for a signal). SIGTERM or
Ctrl-C to the launcher is passed to every process as SIGTERM, so they stop
after the same step with a checkpoint (fmjax.train.preemption); a second one kills
them. Exit status 0 when all of them exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from fmjax import errors

POLL_S = 0.05


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(index: int, count: int, port: int, environ=os.environ) -> dict:
  env = dict(environ, FMJAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             FMJAX_NUM_PROCESSES=str(count), FMJAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu")
  # The device count comes from --config.mesh.cpu_devices, not an inherited XLA flag.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _pump(stream, out, prefix: bytes, lock: threading.Lock):
  """Copies `stream` to `out`, with `prefix` at the start of every line (\\n or \\r)."""
  at_start = True
  fd = stream.fileno()
  while chunk := os.read(fd, 65536):
    pieces = []
    for line in chunk.splitlines(keepends=True):
      if at_start:
        pieces.append(prefix)
      pieces.append(line)
      at_start = line.endswith((b"\n", b"\r"))
    with lock:
      out.write(b"".join(pieces))
      out.flush()


class Launcher:

  def __init__(self, processes: int, devices_per_process: int, args, module="fmjax.main",
               log=None):
    self.count = processes
    self.port = free_port()
    self.procs: list[subprocess.Popen] = []
    self.pumps: list[threading.Thread] = []
    self._lock = threading.Lock()
    self._log = log or (lambda m: print(f"[launch_local] {m}", file=sys.stderr, flush=True))
    self._stops = 0
    self.command = [sys.executable, "-m", module, *args,
                    f"--config.mesh.cpu_devices={devices_per_process}"]

  def start(self):
    for i in range(self.count):
      proc = subprocess.Popen(self.command, env=child_env(i, self.count, self.port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)  # its own group: grain workers die with it
      self.procs.append(proc)
      for stream, out in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
        pump = threading.Thread(target=_pump, args=(stream, out, f"[{i}] ".encode(), self._lock),
                                daemon=True)
        pump.start()
        self.pumps.append(pump)

  def stop(self, *_):
    """SIGTERM to every process (a clean stop); the second call kills them."""
    self._stops += 1
    if self._stops == 1:
      self._log("stopping: SIGTERM to every process (again to kill them)")
      self._signal(signal.SIGTERM, group=False)
    else:
      self._signal(signal.SIGKILL)

  def _signal(self, sig, group=True):
    """`sig` to each process's group, or (group=False) to each process still running."""
    for p in self.procs:
      try:
        if group:
          os.killpg(p.pid, sig)
        elif p.poll() is None:
          p.send_signal(sig)
      except (ProcessLookupError, PermissionError):
        pass

  def wait(self) -> int:
    """Waits for all of them; on the first failure kills the rest. Returns the exit status."""
    while True:
      codes = [p.poll() for p in self.procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        why = f"signal {-code}" if code < 0 else f"status {code}"
        errors.report(f"process {i} exited with {why}; killing the others")
        self._signal(signal.SIGKILL)
        for p in self.procs:
          p.wait()
        self._drain()
        return 128 - code if code < 0 else code
      if all(c == 0 for c in codes):
        self._signal(signal.SIGKILL)  # leftover grain workers, if any
        self._drain()
        return 0
      time.sleep(POLL_S)

  def _drain(self):
    for pump in self.pumps:
      pump.join(timeout=5)


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  parser = errors.ArgumentParser(prog="python -m fmjax.launch_local",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--processes", type=int, default=2, help="how many processes (default 2)")
  parser.add_argument("--devices-per-process", "--devices_per_process", type=int, default=4,
                      dest="devices_per_process",
                      help="fake CPU devices of each process (default 4)")
  parser.add_argument("--module", default="fmjax.main",
                      help="the command each process runs (default fmjax.main)")
  opts = parser.parse_args(ours)
  if opts.processes < 1 or opts.devices_per_process < 1:
    parser.error(f"--processes={opts.processes} and --devices-per-process="
                 f"{opts.devices_per_process} must be >= 1")
  if not args:
    parser.error("give the command's arguments after --, e.g. -- --config=FILE --workdir=DIR")
  launcher = Launcher(opts.processes, opts.devices_per_process, args, opts.module)
  signal.signal(signal.SIGTERM, launcher.stop)
  signal.signal(signal.SIGINT, launcher.stop)
  launcher.start()
  return launcher.wait()


if __name__ == "__main__":
  sys.exit(main())
