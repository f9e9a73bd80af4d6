"""Flax NNX ports of the seed models; one sub-package per model."""
