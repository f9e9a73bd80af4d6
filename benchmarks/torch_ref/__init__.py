"""PyTorch versions of the model ports, written from the same description, for parity and speed."""
