"""Re-aligning a compressed model's scores with the operating point locked on the FP32 model."""

from __future__ import annotations

import torch

from tlcompile.evaluate.metrics import referable_classes


def shift_referable_bias(model: torch.nn.Module, delta: float, *, temperature: float = 1.0) -> None:
    """Add ``delta`` to the referable log-odds of ``model`` (softmax(logits / T)) by shifting the final layer's bias.

    For 2 classes the referable logit, for 5 grades the logits of grades 2-4, move by ``delta * T``: P(referable) /
    P(not) is multiplied by e^delta for every image, so the ranking (AUC) is unchanged and the model file carries it.
    """
    head = model.get_classifier()  # every registry model has one; NNCF's wrapping keeps the model's own methods
    if head.bias is None:
        raise ValueError("the classifier has no bias to shift")
    referable = referable_classes(head.out_features)
    with torch.no_grad():
        head.bias[referable] += delta * temperature
