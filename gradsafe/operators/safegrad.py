"""SafeGrad's alignment term: ``+ rho r`` after the conflict projection.

SafeGrad (Yi et al., 2025, "SafeGrad: Gradient Surgery for Safe LLM Fine-Tuning") keeps a
fine-tuned model aligned in two parts. When the task gradient ``g`` conflicts with the
gradient ``r`` of the alignment loss (``<g, r> < 0``), it is projected off ``r`` (the
A-GEM projection, ``gradsafe.operators.conflict``); then the alignment gradient itself is
added with a weight ``rho``:

    g' = g - min(0, <g, r>) / |r|^2 r + rho r.

``r`` is recomputed every step from the alignment loss, whose headline form is the KL
divergence to the frozen aligned model (``gradsafe.kl_to_reference``): a conflict objective
with that closure, ``refresh_every=1`` and ``rho`` is SafeGrad exactly. With
``mode="observe"`` the term alone is joint training on the two losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["add_alignment_term_"]


def add_alignment_term_(grads: Sequence[torch.Tensor], references: Sequence[torch.Tensor], rho: float) -> None:
    """Add ``rho r`` to each gradient in place (``references``: views of ``r`` shaped like them)."""
    if grads:
        torch._foreach_add_(list(grads), list(references), alpha=rho)
