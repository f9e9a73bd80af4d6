"""Benchmarks of jaxstab and its model ports against PyTorch versions."""
