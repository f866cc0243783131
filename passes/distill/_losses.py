"""Distillation losses: pure torch functions on logits and hidden states, no modules, no I/O.

  kd_kl        T^2 * mean over positions of KL(softmax(t / T) || softmax(s / T))   (Hinton et al., 2015: the T^2
               keeps the gradient scale independent of T)
  feature_mse  mean over matched layers of the mean squared difference of hidden states
  next_token_ce  cross entropy of the student's next-token predictions against the window's own tokens
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> scalar: T^2 * KL(teacher_T || student_T), summed over the vocabulary and averaged over
    every other position. Computed in float32 whatever the input dtype."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...,)
    return kl.mean() * (t * t)


def default_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Student layer i -> teacher layer at the same relative depth: the output of student block i (of n_student)
    is matched with that of teacher block round((i + 1) * n_teacher / n_student) - 1, so equal depths map
    one to one and the last blocks always meet (e.g. 2 of 4 layers -> {0: 1, 1: 3})."""
    if n_student <= 0 or n_teacher <= 0:
        raise ValueError(f"layer counts must be positive (student {n_student}, teacher {n_teacher})")
    return {i: max(0, min(n_teacher - 1, round((i + 1) * n_teacher / n_student) - 1)) for i in range(n_student)}


def feature_mse(student_hidden, teacher_hidden, layer_map: dict[int, int]) -> torch.Tensor:
    """Mean over the pairs of `layer_map` of MSE(student_hidden[i], teacher_hidden[j]).

    The hidden sequences hold one (B, L, H) tensor per block output (transformers' `hidden_states[1:]`)."""
    if not layer_map:
        raise ValueError("feature loss needs at least one matched layer")
    losses = []
    for i, j in sorted(layer_map.items()):
        s, t = student_hidden[i], teacher_hidden[j]
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"student layer {i} has hidden size {s.shape[-1]}, teacher layer {j} has "
                             f"{t.shape[-1]}: the feature loss needs equal widths")
        losses.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(losses).mean()


def next_token_ce(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits, (B, L) ids -> mean cross entropy of positions 0..L-2 predicting tokens 1..L-1."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distill_loss(student_out, teacher_out, ids: torch.Tensor, temperature: float, feature_weight: float = 0.0,
                 layer_map: dict[int, int] | None = None, ce_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts from two transformers outputs (logits, and hidden_states when feature_weight > 0):
    kd_kl + feature_weight * feature_mse + ce_weight * next_token_ce."""
    kl = kd_kl(student_out.logits, teacher_out.logits, temperature)
    total, parts = kl, {"kl": float(kl.detach())}
    if feature_weight:
        f = feature_mse(student_out.hidden_states[1:], teacher_out.hidden_states[1:], layer_map or {})
        total = total + feature_weight * f
        parts["feature"] = float(f.detach())
    if ce_weight:
        ce = next_token_ce(student_out.logits, ids)
        total = total + ce_weight * ce
        parts["ce"] = float(ce.detach())
    return total, parts
