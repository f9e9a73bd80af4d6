"""The seeds' loop guards shared by the PyTorch versions' training loops."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def scan_gradients(model: nn.Module, step: int, history: dict[str, Any]) -> None:
    """The seeds' per-parameter gradient check: the norm of every parameter's gradient,
    appending ``"name@step"`` to ``history["nonfinite_params"]`` for a non-finite one and
    ``(step, global norm)`` to ``history["grad_norms"]``.

    >>> import torch
    >>> m = torch.nn.Linear(1, 1)
    >>> m(torch.ones(1)).sum().backward()
    >>> h = {"nonfinite_params": [], "grad_norms": []}
    >>> scan_gradients(m, 3, h)
    >>> h["nonfinite_params"], h["grad_norms"][0][0]
    ([], 3)
    """
    total = 0.0
    for name, p in model.named_parameters():
        if p.grad is not None:
            norm = p.grad.norm().item()
            total += norm**2
            if not math.isfinite(norm):
                history["nonfinite_params"].append(f"{name}@{step}")
    history["grad_norms"].append((step, total**0.5))
