"""The model: pure functions over parameter pytrees, which take a `ModelSpec` (spec.py).

Nothing here imports training, post-training, data, scaling or conversion.
"""
