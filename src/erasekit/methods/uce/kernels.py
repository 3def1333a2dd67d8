"""The closed form of Unified Concept Editing (Gandikota et al., "Unified Concept Editing in Diffusion Models",
WACV 2024) on one linear projection, model-independent.

For a projection ``y = W c (+ b)`` whose input ``c`` is a text embedding (cross-attention ``to_k``/``to_v``
of a UNet or PixArt; FLUX's and SD3's ``context_embedder`` and pooled-text projection), UCE minimises

    s_e Σ_i ||W' c_i − v*_i||² + s_p Σ_j ||W' c_j − W c_j||² + λ ||W' − W||²_F

over ``W'``: edited inputs ``c_i`` go to target values ``v*_i`` (typically ``W c_guide``, the anchor's
values) and preserved inputs ``c_j`` keep their values. Setting the gradient to zero gives the normal
equations ``W' A = B`` with

    A = λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ        B = λ W + s_e Σ_i v*_i c_iᵀ + s_p Σ_j (W c_j) c_jᵀ

so ``W' = B A⁻¹``. ``A`` is symmetric positive definite for λ > 0, so ``W'ᵀ = A⁻¹ Bᵀ`` is solved with
:func:`torch.linalg.solve` (never an explicit inverse) in float64. The bias, if any, is left alone: it adds
the same vector to ``W c`` and ``W' c``, so the edit maps ``c_i`` to ``v*_i + b`` exactly as the original
maps ``c_guide`` to ``W c_guide + b``.

Defaults (official code): λ = 0.5, s_e = s_p = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasekit.errors import ConfigError

#: λ, the pull towards the original weight (official default).
UCE_DEFAULT_LAMBDA = 0.5
#: s_e, the weight of the edited concepts (official default; lowering it fixed noisy object erasures).
UCE_DEFAULT_ERASE_SCALE = 1.0
#: s_p, the weight of the preserved concepts (official default).
UCE_DEFAULT_PRESERVE_SCALE = 1.0


@dataclass
class UCEStatistics:
    """The data-dependent sums of UCE's normal equations for one projection, in float64.

    Attributes:
        cross: ``s_e Σ_i v*_i c_iᵀ + s_p Σ_j (W c_j) c_jᵀ``, shape ``(out_features, in_features)``.
        gram: ``s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ``, shape ``(in_features, in_features)``.
        count: how many input vectors were summed (edited and preserved).
    """

    cross: torch.Tensor
    gram: torch.Tensor
    count: int = 0

    def __add__(self, other: UCEStatistics) -> UCEStatistics:
        """Sums of two batches of concepts (statistics are additive: prompts can be processed in chunks)."""
        return UCEStatistics(self.cross + other.cross, self.gram + other.gram, self.count + other.count)


def _rows(name: str, value: torch.Tensor | None, width: int) -> torch.Tensor:
    """``value`` as a float64 ``(n, width)`` matrix (a single vector is one row; None is zero rows)."""
    if value is None:
        return torch.zeros(0, width, dtype=torch.float64)
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[1] != width:
        raise ValueError(f"{name} must have shape (n, {width}), got {tuple(value.shape)}")
    return value.detach().to(torch.float64)


def uce_targets(weight: torch.Tensor, guide_inputs: torch.Tensor) -> torch.Tensor:
    """The target values ``v*_i = W c_guide,i`` (no bias, see the module docstring), in float64.

    Args:
        weight: the projection's weight, shape ``(out_features, in_features)``.
        guide_inputs: the guide (anchor) concepts' input vectors, ``(n, in_features)``, one per edited concept.
    """
    rows = _rows("guide_inputs", guide_inputs, weight.shape[1])
    return rows @ weight.detach().to(torch.float64).T


def uce_statistics(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor | None,
    erase_targets: torch.Tensor | None,
    preserve_inputs: torch.Tensor | None = None,
    *,
    erase_scale: float = UCE_DEFAULT_ERASE_SCALE,
    preserve_scale: float = UCE_DEFAULT_PRESERVE_SCALE,
) -> UCEStatistics:
    """The sums of UCE's normal equations for a batch of edited and preserved concepts.

    Args:
        weight: the original projection weight ``W``, ``(out_features, in_features)``.
        erase_inputs: ``c_i``, ``(n_e, in_features)`` (any number of concepts at once), or None.
        erase_targets: ``v*_i``, ``(n_e, out_features)`` (see :func:`uce_targets`), or None with no inputs.
        preserve_inputs: ``c_j``, ``(n_p, in_features)``, whose values ``W c_j`` are kept, or None.
        erase_scale: ``s_e``.
        preserve_scale: ``s_p``.

    Raises:
        ConfigError: a negative scale.
        ValueError: shapes that do not fit ``weight``, or edited inputs without as many targets.
    """
    if erase_scale < 0 or preserve_scale < 0:
        raise ConfigError(f"UCE scales must be >= 0, got erase_scale={erase_scale}, preserve_scale={preserve_scale}")
    if weight.dim() != 2:
        raise ValueError(f"UCE edits a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float64)
    c_e = _rows("erase_inputs", erase_inputs, in_features)
    v_e = _rows("erase_targets", erase_targets, out_features)
    if c_e.shape[0] != v_e.shape[0]:
        raise ValueError(f"{c_e.shape[0]} edited inputs but {v_e.shape[0]} targets")
    c_p = _rows("preserve_inputs", preserve_inputs, in_features).to(w.device)
    c_e, v_e = c_e.to(w.device), v_e.to(w.device)
    # Preserved concepts are edited concepts whose target is their own current value W c_j.
    cross = erase_scale * (v_e.T @ c_e) + preserve_scale * ((c_p @ w.T).T @ c_p)
    gram = erase_scale * (c_e.T @ c_e) + preserve_scale * (c_p.T @ c_p)
    return UCEStatistics(cross=cross, gram=gram, count=c_e.shape[0] + c_p.shape[0])


def uce_solve(weight: torch.Tensor, statistics: UCEStatistics, lam: float = UCE_DEFAULT_LAMBDA) -> torch.Tensor:
    """Solve UCE's normal equations: ``W' = (λ W + cross)(λ I + gram)⁻¹``, returned in ``weight``'s dtype.

    Raises:
        ConfigError: λ < 0, or the system is singular (λ = 0 with fewer independent concepts than inputs).
    """
    if not lam >= 0:
        raise ConfigError(f"UCE lambda must be >= 0, got {lam}")
    w = weight.detach().to(torch.float64)
    a = lam * torch.eye(w.shape[1], dtype=torch.float64, device=w.device) + statistics.gram.to(w.device)
    b = lam * w + statistics.cross.to(w.device)
    try:
        # W' A = B with A symmetric  <=>  A W'ᵀ = Bᵀ.
        solved = torch.linalg.solve(a, b.T).T
    except RuntimeError as error:  # torch raises a LinAlgError (a RuntimeError) for a singular A
        raise ConfigError(f"UCE system is singular (lambda={lam}); use lambda > 0: {error}") from None
    return solved.to(weight.dtype)


def uce_edit(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor | None,
    erase_targets: torch.Tensor | None,
    preserve_inputs: torch.Tensor | None = None,
    *,
    lam: float = UCE_DEFAULT_LAMBDA,
    erase_scale: float = UCE_DEFAULT_ERASE_SCALE,
    preserve_scale: float = UCE_DEFAULT_PRESERVE_SCALE,
) -> torch.Tensor:
    """The edited weight ``W'`` for one projection: :func:`uce_statistics` then :func:`uce_solve`.

    With no concepts at all, or λ → ∞, this returns ``W`` (up to rounding).
    """
    statistics = uce_statistics(
        weight, erase_inputs, erase_targets, preserve_inputs, erase_scale=erase_scale, preserve_scale=preserve_scale
    )
    return uce_solve(weight, statistics, lam)


def last_word_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last word token of each prompt: ``attention_mask.sum(-1) − 2`` (the official choice).

    The tokens of a prompt are ``[BOS] words… EOS`` (CLIP) or ``words… EOS`` (T5), so the last word sits two
    before the end of the mask. For the empty prompt under T5 that index would be −1, which wraps to a
    padding slot; it is clamped to 0 (the EOS token) instead.

    Args:
        attention_mask: ``(batch, sequence)`` of 0/1.
    """
    return (attention_mask.sum(-1) - 2).clamp(min=0)
