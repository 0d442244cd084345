"""fmjax: training foundation language models in JAX, and studying how they scale.

Entry points: `python -m fmjax.main` (train an experiment file) and
`python -m fmjax.sample` (generate from a trained workdir).
"""
