"""The model: pure functions over parameter pytrees.

Parameter declarations (params), logical-axis sharding (sharding), the layers
and attention kinds (layers, rope, gqa, mla), the feed-forward kinds (mlp,
moe, dispatch), one Transformer layer (block), the decoder (model), multi-token
prediction (mtp), cached decoding (decoding) and what a model costs (cost).
Everything here takes a `ModelSpec` (spec) or the model section of a config;
nothing here imports training, post-training, data, scaling or conversion.
"""
