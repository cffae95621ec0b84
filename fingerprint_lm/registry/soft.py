"""Soft-decision attribution: name the user behind an image from the extractor's logits, not only
from their signs, with an exact false-accusation bound.

Hard decoding (:meth:`CodeIndex.identify`) keeps one bit per logit and counts matches, so a bit
the extractor reads at +0.01 counts as much as one it reads at +5. The soft score of user ``u``
weighs each bit by the extractor's confidence,

    T_u = sum_i q_i c_ui,       q_i = round(levels * l_i / max_j |l_j|)  (integers in [-levels, levels]),

the log-likelihood-ratio statistic when logits are calibrated log-odds (``log P(c_i = 1 | y) -
log P(c_i = 0 | y) = l_i`` makes ``sum_i c_i l_i`` the log-likelihood of code ``c`` up to a
constant), quantised so that its null distribution can be computed exactly.

The bound needs no model of the logits. An innocent user's code is drawn independently of the
image, its bits fair coins, so *given the image* (hence ``q``) their score ``sum_i q_i c_i`` is a
sum of independent two-point variables whose distribution a convolution over bits gives exactly
(:func:`soft_tail`). ``P[T_innocent >= T_obs | y]`` is therefore an exact p-value whatever the
extractor does, and ``N`` times it (Bonferroni over the registry) bounds the probability that any
innocent reaches the best user's score. With ``q = sign(l)`` the score is the match count and the
tail is the binomial one: hard decoding is the special case. As for hard decoding, the bound
assumes innocents' codes independent of the image: true for random codes, slightly optimistic for
a min-distance codebook.

The bound holds on average over the registry's random codes, not for every registry: when an
extractor's logits are correlated on unmarked images, a code that lies along a shared direction
scores high on many of them at once, and one registry of 100 accused 394 of 10^4 unmarked images
at fpr 1e-3, bound 10 (the carrier reader, ``experiments/results/soft_code_null.md``).
``decoding="soft_code_null"`` adds a second test that every accused code must also pass: its score
against the law of that same code's score over unmarked images (:class:`CodeNull`, a Gaussian
approximation from their centre and covariance). An accusation needs both tests, so the exact
bound above still holds, and per registry the count stays near or below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from fingerprint_lm.config_schema import DECODINGS  # the choices the distributor and sweep configs check
from fingerprint_lm.errors import ConfigError, DataError, check_choice, check_int, check_probability
from fingerprint_lm.metrics.bits import binomial_p_value
from fingerprint_lm.registry.codes import hamming_blocks, pack_bits, packed_dot, unpack_bits
from fingerprint_lm.registry.index import CodeIndex

SOFT_LEVELS = 64  # quantisation levels of the largest |logit|: a score resolution of 1/64 of a bit


def _as_logits(logits, k: int | None = None) -> np.ndarray:
    """Logits as ``float64 [n, k]`` (one image ``[k]`` too); DataError for NaN, inf, another shape
    or, when ``k`` is given, another code length."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] == 0:
        raise DataError(f"logits must have shape [n_images, k], got {np.shape(logits)}")
    if k is not None and values.shape[1] != k:
        raise DataError(f"logits have {values.shape[1]} bits but the registry holds {k}-bit codes")
    if not np.all(np.isfinite(values)):
        raise DataError("extractor logits contain NaN or inf")
    return values


def quantized_weights(logits, levels: int = SOFT_LEVELS) -> np.ndarray:
    """Per-image integer bit weights ``int64 [n, k]``: logits scaled so the largest ``|l|`` of each
    row is ``levels`` and rounded (an all-zero row stays zero)."""
    check_int("levels", levels)
    values = _as_logits(logits)
    top = np.abs(values).max(axis=1, keepdims=True)
    return np.rint(values / np.where(top > 0, top, 1.0) * levels).astype(np.int64)  # subnormal tops too


def null_tail(weights) -> tuple[int, np.ndarray]:
    """The exact law of ``sum_i w_i c_i`` for fair independent coins ``c_i`` in {0, 1} and integer
    weights ``w`` ``[k]``: ``(low, tail)`` with ``tail[j] = P[sum >= low + j]``. Built bit by bit:
    each coin halves the mass and shifts one half by ``|w_i|`` (a coin whose weight is negative
    counts from ``low``, the smallest reachable sum, and flips: the same law)."""
    w = np.asarray(weights, dtype=np.int64)
    low = int(w[w < 0].sum())
    pmf = np.zeros(int(np.abs(w).sum()) + 1)
    pmf[0], span = 1.0, 1
    for wi in np.abs(w[w != 0]):
        pmf[wi : wi + span] += pmf[:span].copy()
        pmf[: span + wi] *= 0.5
        span += int(wi)
    return low, np.cumsum(pmf[::-1])[::-1]


def _tail_at(low: int, tail: np.ndarray, score) -> np.ndarray:
    at = np.asarray(score, dtype=np.int64) - low
    return np.where(at >= len(tail), 0.0, np.minimum(tail[np.clip(at, 0, len(tail) - 1)], 1.0))


def soft_tail(weights: np.ndarray, observed) -> np.ndarray:
    """``P[sum_i w_i c_i >= observed]`` for fair coins, exactly, per row of the integer weights
    ``[n, k]`` (:func:`null_tail`). ``observed``: one score per row ``[n]`` (or one for all), or
    many ``[n, u]`` (say, every registered code's score on each image): each row's law is built
    once for all of its scores, and the result has ``observed``'s shape."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.int64))
    observed = np.asarray(observed, dtype=np.int64)
    if observed.ndim < 2:
        observed = np.broadcast_to(observed, (weights.shape[0],))
    return np.array([_tail_at(*null_tail(w), t) for w, t in zip(weights, observed, strict=True)], dtype=np.float64)


_BLOCK_ENTRIES = 1 << 22  # query x user x word XORs computed at once (uint64: 32 MiB)


@dataclass(frozen=True)
class CodeNull:
    """The law of one code's raw score over unmarked images, for ``soft_code_null`` decoding: the
    unmarked logits' centre ``[k]`` and a root ``[k, k]`` of their covariance (``S = root root'``).
    For a code ``c`` with signs ``s = 2c - 1``, ``z = s.(l - centre) / |root' s|`` is approximately
    standard normal over unmarked images, whatever the code's direction."""

    centre: np.ndarray
    root: np.ndarray

    def p_values(self, logits, bits) -> np.ndarray:
        """One-sided Gaussian p-values ``[n_images, n_codes]`` of the codes ``bits`` ``[u, k]``
        for the raw ``logits`` ``[n, k]``."""
        signs = 2.0 * np.atleast_2d(np.asarray(bits, dtype=np.float64)) - 1.0
        spread = np.linalg.norm(signs @ np.asarray(self.root, dtype=np.float64), axis=1)
        centred = np.atleast_2d(np.asarray(logits, dtype=np.float64)) - self.centre
        return ndtr(-(centred @ signs.T) / np.where(spread > 0, spread, 1.0))


def soft_identify(logits, index: CodeIndex, fpr: float = 1e-6, levels: int = SOFT_LEVELS,
                  code_null: CodeNull | None = None) -> list[dict]:
    """Soft-decision identification of each image's logits ``[n, k]`` among ``index``'s codes.

    Each row gives ``user_id`` (the accused user or None), ``nearest_user_id``, ``score``,
    ``matching_bits`` (hard matches with that user, for information), ``n_nearest`` (users tied
    with them; with ``code_null``, tied users who also pass it), ``p_value`` (the exact tail of
    ``score``, Bonferroni-corrected over the registry) and ``accused`` (``p_value <= fpr``). When
    somebody is accused they are the best-scoring user of the whole registry (with ``code_null``:
    of the users passing it); otherwise the row describes the Hamming-nearest user (nobody passes,
    so who scores best does not change the verdict).

    Exact without scoring every user: user ``u``'s score falls short of the best possible one by
    the sum of ``|q_i|`` over the bits where their code and the logits' signs differ, at least the
    sum of the ``d_u`` smallest ``|q_i|`` for Hamming distance ``d_u``. So only users whose
    distance allows the threshold score are scored, after the bit-packed Hamming search.

    With ``code_null`` (``soft_code_null`` decoding) a user is accused only when their code also
    passes :meth:`CodeNull.p_values` at ``fpr / N``; the best exact score among the users passing
    both is named, and ``p_value`` is the larger of the two corrected p-values.
    """
    check_probability("fpr", fpr)
    values = _as_logits(logits, index.k)
    weights = quantized_weights(values, levels)
    if len(index) == 0:
        return [_empty() for _ in weights]
    # The logits' own signs, as printed beside the verdict (a bit whose weight rounds to 0 costs
    # nothing whichever way it goes, so the bound below holds with these bits too).
    hard = (values > 0).astype(np.uint8)
    rows = []
    for start, distances in hamming_blocks(pack_bits(hard).reshape(len(hard), -1), index.packed, _BLOCK_ENTRIES):
        stop = start + len(distances)
        rows += [_identify_one(w, h, d, index, fpr, (code_null, v) if code_null is not None else None)
                 for w, h, d, v in zip(weights[start:stop], hard[start:stop], distances, values[start:stop],
                                       strict=True)]
    return rows


def _identify_one(weights: np.ndarray, hard: np.ndarray, distances: np.ndarray, index: CodeIndex, fpr: float,
                  null: tuple[CodeNull, np.ndarray] | None = None) -> dict:
    n_users = len(index)
    low, tail = null_tail(weights)
    reachable = np.flatnonzero(tail * n_users <= fpr)  # sums (from low) an accusation needs
    if len(reachable):
        needed = low + int(reachable[0])  # the smallest accusable score
        best_possible = int(weights[weights > 0].sum())
        shortfall = np.concatenate([[0], np.cumsum(np.sort(np.abs(weights)))])  # by Hamming distance
        max_distance = int(np.searchsorted(shortfall, best_possible - needed, side="right")) - 1
        candidates = np.flatnonzero(distances <= max_distance)
        if len(candidates):
            scores = packed_dot(index.packed, index.k, weights, candidates)
            passes = scores >= needed
            code_p = np.zeros(len(candidates))
            if null is not None and passes.any():  # the code's own unmarked law too
                bits = unpack_bits(index.packed[candidates[passes]], index.k).reshape(-1, index.k)
                code_p[passes] = null[0].p_values(null[1], bits)[0]
                passes &= code_p * n_users <= fpr
            if passes.any():  # accused: the best of every user who reaches `needed` (and passes the null)
                best = int(np.where(passes, scores, scores.min() - 1).max())
                top = int(np.flatnonzero(passes & (scores == best))[0])
                return _row(index, int(candidates[top]), best, int((passes & (scores == best)).sum()),
                            hard, low, tail, float(code_p[top]), accused=True)
    nearest = int(distances.argmin())
    score = int(packed_dot(index.packed, index.k, weights, np.array([nearest]))[0])
    ties = int((distances == distances[nearest]).sum())
    code_p = float(null[0].p_values(null[1], unpack_bits(index.packed[nearest], index.k)[None])[0, 0]) if null else 0.0
    return _row(index, nearest, score, ties, hard, low, tail, code_p, accused=False)


def _row(index: CodeIndex, user: int, score: int, ties: int, hard: np.ndarray, low: int, tail: np.ndarray,
         code_p: float, accused: bool) -> dict:
    """One verdict; ``p_value``: the larger of the exact tail of ``score`` and ``code_p`` (the
    per-code null's, 0 without one), Bonferroni-corrected: ``<= fpr`` exactly when ``accused``
    (ties: the first registered is named, as in hard decoding)."""
    code = unpack_bits(index.packed[user], index.k)
    p_value = min(1.0, max(float(_tail_at(low, tail, score)), code_p) * len(index))
    return {"user_id": index.user_ids[user] if accused else None, "nearest_user_id": index.user_ids[user],
            "score": score, "matching_bits": int((hard == code).sum()), "n_nearest": ties,
            "p_value": p_value, "accused": accused}


def _empty() -> dict:
    return {"user_id": None, "nearest_user_id": None, "score": 0, "matching_bits": 0, "n_nearest": 0,
            "p_value": 1.0, "accused": False}


def identify_logits(logits, index: CodeIndex, fpr: float = 1e-6, decoding: str = "soft",
                    code_null: CodeNull | None = None) -> list[dict]:
    """Name the user behind each image from its extractor logits ``[n, k]``: ``soft``,
    ``soft_whitened`` and ``soft_code_null`` (:func:`soft_identify` of what is passed: for
    ``soft_whitened`` the caller passes the extractor's logits whitened on unmarked images,
    ``models/extractor.py: soft_weights``; for ``soft_code_null`` the raw logits and the reader's
    ``code_null``, required; the exact p-value bounds each) or ``hard`` (signs only,
    :meth:`CodeIndex.identify_many`)."""
    check_choice("decoding", decoding, DECODINGS)
    if decoding == "hard":
        return index.identify_many((_as_logits(logits, index.k) > 0).astype(np.uint8), fpr=fpr)
    if decoding == "soft_code_null":
        return soft_identify(logits, index, fpr, code_null=_needed(code_null))
    return soft_identify(logits, index, fpr)


def _needed(code_null: CodeNull | None) -> CodeNull:
    if code_null is None:  # no silent fallback: a wrong null would be a weaker test, unannounced
        raise ConfigError("decoding=soft_code_null needs the reader's law over unmarked images (code_null)")
    return code_null


def code_p_values(logits, code, decoding: str = "soft", code_null: CodeNull | None = None) -> np.ndarray:
    """Uncorrected p-value of one code ``[k]`` for each image's logits ``[n, k]``: the probability
    that a random code matches the image as well (soft: the exact tail of its score; hard: the
    binomial tail of its matching bits; ``soft_code_null``: the larger of the exact tail and the
    code's own unmarked p-value). A one-code detection test: ``p <= fpr``."""
    check_choice("decoding", decoding, DECODINGS)
    code = np.asarray(code, dtype=np.int64).reshape(-1)
    if decoding != "hard":
        weights = quantized_weights(logits)
        exact = soft_tail(weights, weights @ code)
        if decoding != "soft_code_null":
            return exact
        return np.maximum(exact, _needed(code_null).p_values(_as_logits(logits, len(code)), code[None])[:, 0])
    matches = ((np.asarray(logits) > 0) == code.astype(bool)).sum(axis=1)
    return np.asarray(binomial_p_value(matches, len(code)), dtype=np.float64)
