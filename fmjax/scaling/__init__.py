"""Scaling studies: the size dial and horizons (sizing), sweeps (sweep), scaling-law
fits (fit), their plots (plots) and the command (`python -m fmjax.scaling`)."""
