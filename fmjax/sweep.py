"""Run, print or collect the sweep of an experiment file (fmjax/scaling/sweep.py).

  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=runs/scaling_tiny
"""

import sys

from fmjax.scaling.sweep import main

if __name__ == "__main__":
  sys.exit(main())
