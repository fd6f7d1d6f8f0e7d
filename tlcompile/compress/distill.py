"""Knowledge distillation from the FP32 model (Hinton et al., 2015): KL on softened logits plus cross-entropy.

``loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)``

The T^2 factor keeps the soft term's gradient scale independent of the temperature. The teacher sees exactly the
batch the student saw (augmentation included): :func:`distillation` records the student's input with a forward
pre-hook, so :func:`tlcompile.train.loop.fit` trains with it unchanged (its loss takes ``(logits, targets)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE; logits (N, C), targets (N,)."""
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * soft + (1.0 - alpha) * hard


class Distiller:
    """Loss callable ``(student_logits, targets) -> loss`` that runs the teacher on the student's last input."""

    def __init__(self, teacher: nn.Module, *, temperature: float, alpha: float) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self._inputs: torch.Tensor | None = None

    def record(self, _module: nn.Module, args: tuple) -> None:
        if _module.training:  # validation passes (eval mode) need no teacher
            self._inputs = args[0]

    def __call__(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._inputs is None or self._inputs.shape[0] != student_logits.shape[0]:
            raise RuntimeError("distillation: no recorded student input for this batch (is the student in train mode?)")
        with torch.no_grad():
            teacher_logits = self.teacher(self._inputs)
        self._inputs = None
        return distillation_loss(
            student_logits, teacher_logits, targets, temperature=self.temperature, alpha=self.alpha
        )


@contextmanager
def distillation(student: nn.Module, teacher: nn.Module, *, temperature: float, alpha: float) -> Iterator[Distiller]:
    """Within the block, the yielded loss distils ``teacher`` into ``student``; the teacher stays in eval mode."""
    was_training = teacher.training
    teacher.eval()
    requires_grad = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    distiller = Distiller(teacher, temperature=temperature, alpha=alpha)
    handle = student.register_forward_pre_hook(distiller.record)
    try:
        yield distiller
    finally:
        handle.remove()
        for p, flag in zip(teacher.parameters(), requires_grad, strict=True):
            p.requires_grad_(flag)
        teacher.train(was_training)
