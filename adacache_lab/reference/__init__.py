"""Procedural data and a small judge classifier for training and evaluating a tiny reference video DiT."""
