"""Colluder tracing from the extractor's soft outputs.

When several users merge their copies, the merged model's images carry a blend of their codes:
bits on which the colluders agree stay confident, the others drift towards 1/2. Hard decoding
(:meth:`CodeIndex.identify`) throws that confidence away; tracing keeps it.

Score. For images from one suspect model with extractor outputs ``p`` ``[n_images, k]`` (sigmoid
probabilities), the evidence on bit ``i`` is ``w_i = mean_images(2 p_i - 1)`` in ``[-1, 1]``:
its sign is the bit the model votes for, its size how consistently. The mean of ``2p - 1`` (rather
than of clipped logits) is bounded, so one over-confident extractor output cannot dominate, and
bits the colluders disagree on (``p`` near 1/2 or flipping between images) contribute ~0. A user
with code ``c_u`` scores

    score_u = sum_i w_i (2 c_ui - 1) / sqrt(sum_i w_i^2),

the cosine-like agreement between the evidence and the user's code in +-1 form, scaled so that it
does not depend on ``k`` or on how confident the extractor is.

Calibration. For an innocent user the code is independent of the outputs and its bits are fair
coins, so ``score_u = sum_i a_i s_i`` with ``s_i = +-1`` Rademacher and ``sum_i a_i^2 = 1``.
Hoeffding's inequality gives ``P[score_u >= t] <= exp(-t^2 / 2)`` whatever the evidence ``w``, so
with ``N`` registered users and a Bonferroni correction, accusing users with
``score >= t = sqrt(2 ln(N / fpr))`` falsely accuses anyone with probability at most ``fpr``.
``p_value_bound = min(1, N exp(-score^2 / 2))`` is the corrected bound for each user.
The bound assumes innocents' codes are independent of the colluders' codes: true for random codes;
a min-distance codebook makes them slightly dependent (and the bound slightly optimistic).
The bound is conservative (the Gaussian tail it mimics is smaller by about a factor ``t``), so the
real false-accusation rate is well below ``fpr``; the price is power: with 48-bit codes, 2-3
colluders usually rank first but score below the threshold at ``fpr = 1e-6``.

Two kinds of evidence (:func:`trace_evidence`). Pooling helps against merged models and blended
images, whose every image carries a blend of codes; it hurts when colluders pool images (each
image one user's full code): the pooled evidence is then a blend again, below the threshold,
although every image names its user. So tracing also attributes each image on its own (nearest
code, binomial p-value, Bonferroni over the registry; or soft-decision: :mod:`fingerprint_lm.registry.soft`)
and accuses every user named by an image.
The false-accusation budget ``fpr`` is split: ``fpr / 2`` for the pooled score and ``fpr / 2``
shared by the ``n`` images (``fpr / (2 n)`` each, Bonferroni over images), so by the union bound
an innocent is accused by either kind with probability at most ``fpr``.
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint_lm.errors import DataError, check_int, check_probability
from fingerprint_lm.registry.codes import packed_dot
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import identify_logits
from fingerprint_lm.registry.store import Registry


def bit_evidence(probs) -> np.ndarray:
    """Per-bit evidence ``w = mean over images of (2 p - 1)``, ``float64 [k]``.

    ``probs``: extractor sigmoid outputs ``[n_images, k]`` (or ``[k]`` for one image) in [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise DataError(f"probs must have shape [n_images, k], got {np.shape(probs)}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise DataError("probs must be probabilities in [0, 1] (apply the sigmoid first)")
    return (2.0 * p - 1.0).mean(axis=0)


def tracing_threshold(n_users: int, fpr: float) -> float:
    """Score above which a user is accused: ``sqrt(2 ln(n_users / fpr))`` (Hoeffding + Bonferroni)."""
    check_probability("fpr", fpr)
    return math.sqrt(2.0 * math.log(check_int("n_users", n_users) / float(fpr)))


def score_codes(probs, codes_bits) -> np.ndarray:
    """Tracing score of each 0/1 code row ``[N, k]`` against soft outputs ``probs``; ``float64 [N]``.

    All scores are 0 when the evidence is all zero (every output exactly 1/2).
    """
    w = bit_evidence(probs)
    codes = np.asarray(codes_bits)
    if codes.ndim != 2 or codes.shape[1] != w.shape[0]:
        raise DataError(f"codes must have shape [N, {w.shape[0]}], got {codes.shape}")
    norm = float(np.sqrt(np.sum(w * w)))
    if norm == 0.0:
        return np.zeros(codes.shape[0])
    # sum_i w_i (2c_i - 1) = 2 (c . w) - sum_i w_i
    return (2.0 * (codes.astype(np.float64) @ w) - w.sum()) / norm


def _score_index(probs, index: CodeIndex) -> np.ndarray:
    """:func:`score_codes` straight from the packed codes (:func:`~fingerprint_lm.registry.codes.packed_dot`:
    ``ceil(k/8)`` byte-table lookups per user instead of unpacking ``k`` bits)."""
    w = bit_evidence(probs)
    k = index.k
    if w.shape[0] != k:
        raise DataError(f"probs have {w.shape[0]} bits but the registry holds {k}-bit codes")
    norm = float(np.sqrt(np.sum(w * w)))
    if norm == 0.0 or len(index) == 0:
        return np.zeros(len(index))
    return (2.0 * packed_dot(index.packed, k, w) - w.sum()) / norm


def trace(probs, index: CodeIndex | Registry, fpr: float = 1e-6, top: int = 10) -> list[dict]:
    """Rank registered users as colluders behind one suspect model.

    Parameters:
        probs: extractor sigmoid outputs ``[n_images, k]`` for images from ONE suspect model.
        index: a :class:`CodeIndex` or a :class:`Registry` (its codes are used).
        fpr: allowed probability of accusing any innocent user (over the whole registry).
        top: number of suspects returned; every accused user is returned even beyond ``top``.

    Returns:
        suspects by decreasing score: ``{"user_id", "score", "p_value_bound", "accused"}``, where
        ``p_value_bound = min(1, N exp(-score^2/2))`` for positive scores (1 otherwise) and
        ``accused`` means ``score >= tracing_threshold(N, fpr)``.
    """
    if isinstance(index, Registry):
        index = index.index()
    n = len(index)
    threshold = tracing_threshold(max(n, 1), fpr)
    if n == 0:
        bit_evidence(probs)  # still reject malformed input
        return []
    scores = _score_index(probs, index)
    n_accused = int(np.count_nonzero(scores >= threshold))
    keep = min(n, max(int(top), n_accused))
    if keep <= 0:
        return []
    order = np.argpartition(-scores, keep - 1)[:keep] if keep < n else np.arange(n)
    order = order[np.argsort(-scores[order], kind="stable")]
    out = []
    for i in order:
        s = float(scores[i])
        bound = pooled_bound(s, n)
        out.append(
            {
                "user_id": index.user_ids[i],
                "score": s,
                "p_value_bound": bound,
                "accused": bool(s >= threshold),
            }
        )
    return out


def trace_evidence(probs, index: CodeIndex | Registry, fpr: float = 1e-6, top: int = 10, logits=None,
                   decoding: str = "soft", code_null=None) -> dict:
    """Every user that per-image attribution or the pooled score supports, at a total false
    accusation probability ``fpr`` (see the module docstring). Per-image attribution decodes each
    image's ``logits`` (``[n_images, k]``; None: the log-odds of ``probs``) with ``decoding`` and,
    for ``soft_code_null``, ``code_null`` (:func:`~fingerprint_lm.registry.soft.identify_logits`).

    Returns ``{"per_image_fpr", "pooled_fpr", "threshold", "suspects": [...]}``; each suspect has
    ``user_id``, ``n_images`` (images attributed to them), ``score`` (pooled), ``p_value_bound``
    (the smaller of the two evidences' bounds, each already corrected for the other half of the
    budget: a user is accused exactly when it is ``<= fpr``), ``evidence`` (``per_image``,
    ``pooled``, ``both`` or None) and ``accused``; accused users first, then by score; ``top``
    suspects plus every accused one.
    """
    check_probability("fpr", fpr)
    if isinstance(index, Registry):
        index = index.index()
    p = np.asarray(probs, dtype=np.float64)
    n_images = 1 if p.ndim == 1 else p.shape[0]
    per_image_fpr, pooled_fpr = fpr / (2.0 * n_images), fpr / 2.0
    n = len(index)
    out = {"per_image_fpr": per_image_fpr, "pooled_fpr": pooled_fpr,
           "threshold": tracing_threshold(max(n, 1), pooled_fpr), "suspects": []}
    if n == 0:
        bit_evidence(probs)  # still reject malformed input
        return out
    scores = _score_index(probs, index)
    named: dict[int, list[float]] = {}  # user row -> corrected p-values of the images naming them
    row_of: dict[str, int] = {}
    if logits is None:  # the log-odds of probs, finite where a sigmoid saturated
        clipped = np.clip(p.reshape(n_images, -1), 1e-12, 1.0 - 1e-12)
        logits = np.log(clipped) - np.log1p(-clipped)
    for result in identify_logits(np.asarray(logits).reshape(n_images, -1), index, per_image_fpr, decoding, code_null):
        if result["accused"]:
            row_of = row_of or {user: i for i, user in enumerate(index.user_ids)}
            named.setdefault(row_of[result["user_id"]], []).append(result["p_value"])
    pooled = scores >= out["threshold"]
    rows = set(named) | set(np.flatnonzero(pooled).tolist())
    rows |= set(np.argsort(-scores, kind="stable")[: max(int(top), 0)].tolist())
    suspects = [_suspect(index.user_ids[i], float(scores[i]), named.get(i, []), bool(pooled[i]), n, n_images)
                for i in rows]
    suspects.sort(key=lambda row: (not row["accused"], -row["score"]))
    out["suspects"] = suspects
    return out


def pooled_bound(score: float, n_users: int) -> float:
    """Hoeffding + Bonferroni bound on an innocent reaching ``score``: ``min(1, N exp(-score^2/2))``."""
    return min(1.0, n_users * math.exp(-0.5 * score * score)) if score > 0 else 1.0


def _suspect(user_id: str, score: float, p_values: list[float], pooled_accused: bool, n_users: int,
             n_images: int) -> dict:
    per_image_bound = min(1.0, 2.0 * n_images * min(p_values)) if p_values else 1.0
    pooled = pooled_bound(score, 2 * n_users)  # corrected for the other half of the budget
    evidence = {(True, True): "both", (True, False): "per_image", (False, True): "pooled"}.get(
        (bool(p_values), pooled_accused))
    return {
        "user_id": user_id,
        "n_images": len(p_values),
        "score": score,
        "p_value_bound": min(per_image_bound, pooled),
        "evidence": evidence,
        "accused": evidence is not None,
    }

