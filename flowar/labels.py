"""Class labels: validation, and the null class that stands for "no label" (classifier-free guidance)."""

from __future__ import annotations

import torch


def check_class_labels(class_labels, batch_size: int | None, *, num_classes: int, device,
                       allow_null: bool = False) -> torch.Tensor:
    """Validated (B,) long labels for a model with ``num_classes`` classes (0 = unconditional).

    The null class id is always ``num_classes``; an unconditional model gets it everywhere and needs
    ``batch_size`` instead of labels. With ``allow_null``, ``class_labels=None`` on a conditional model means
    the null class for ``batch_size`` images (sampling with no class information). Labels must be integers:
    float labels are refused rather than truncated.
    """
    if num_classes == 0 or (allow_null and class_labels is None):
        if class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional model (num_classes=0)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 when class_labels is None, got {batch_size!r}")
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    if class_labels is None:
        raise ValueError(f"class_labels is required: this model has {num_classes} classes")
    labels = torch.as_tensor(class_labels, device=device)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be integers, got {labels.dtype} values")
    if labels.ndim > 1:
        # A (B, N) tensor would otherwise be read as B * N images.
        raise ValueError(f"class_labels must be one label per image (a list or a 1-D tensor), got shape "
                         f"{tuple(labels.shape)}")
    labels = labels.long().reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels must hold at least one label")
    if batch_size is not None and batch_size != labels.numel():
        raise ValueError(f"batch_size ({batch_size}) disagrees with len(class_labels) ({labels.numel()})")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {bad.unique().tolist()}")
    return labels
