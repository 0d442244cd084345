"""Hugging Face checkpoints: the formats' tables, config mapping, tensor layouts and files."""
