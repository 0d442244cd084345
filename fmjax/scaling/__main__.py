"""python -m fmjax.scaling: see fmjax/scaling/cli.py."""

import sys

from fmjax.scaling.cli import main

sys.exit(main())
