"""Huge pages for XLA:CPU's buffers: one environment setting, made before start-up.

On a CPU, every execution of a compiled step allocates its temporary buffers
afresh (about 1 GiB for a 20M-parameter model at batch 8 x 256), and glibc
serves allocations that large with a new `mmap`. The kernel then faults the
memory in one 4 KiB page at a time: about 270,000 page faults and 0.6 s of
kernel time per step, every step. glibc's `glibc.malloc.hugetlb=1` tunable
asks for transparent huge pages on those mappings instead, which cuts the
faults ~400-fold (measured figures in tools/BENCHMARKS.md).

glibc reads its tunables once, when the process starts, so the setting cannot
be made from inside a running Python. `reexec()`, called first thing by the
command-line entry points (`python -m fmjax.main`, `fmjax.bench`), restarts
the process with the tunable added to `GLIBC_TUNABLES` when it is missing,
the kernel offers transparent huge pages, and the C library is glibc. Set
`FMJAX_HUGEPAGES=0` to leave the process as it is.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str:
  """The kernel's transparent-huge-page mode (always, madvise or never); 'never' if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return "never"
  return next((w.strip("[]") for w in text.split() if w.startswith("[")), "never")


def tunables_with_hugepages(environ) -> str | None:
  """GLIBC_TUNABLES with huge pages added, or None when nothing needs to change.

  Nothing changes when the user opted out (FMJAX_HUGEPAGES=0) or already set
  the tunable themselves (to any value).
  """
  if environ.get("FMJAX_HUGEPAGES", "1") == "0":
    return None
  existing = environ.get("GLIBC_TUNABLES", "")
  names = {t.split("=")[0] for t in existing.split(":") if t}
  if TUNABLE in names:
    return None
  return ":".join(t for t in (existing, f"{TUNABLE}=1") if t)


def reexec(argv=None, environ=None, thp: str | None = None) -> None:
  """Restarts this process with huge pages for malloc, if it helps and is not set yet.

  Returns without doing anything when it does not apply; otherwise does not
  return. `argv` defaults to the interpreter's original command line.
  """
  environ = os.environ if environ is None else environ
  if platform.libc_ver()[0] != "glibc" or (thp or thp_mode()) == "never":
    return
  tunables = tunables_with_hugepages(environ)
  if tunables is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, {**environ, "GLIBC_TUNABLES": tunables})
