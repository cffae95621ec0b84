"""The bit-packed nearest-code search that names the user behind an extracted fingerprint: a
:class:`CodeIndex` holds every registered code packed into ``uint64`` words and answers with the
nearest user, the matching bits and the Bonferroni-corrected binomial p-value."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fingerprint_lm.errors import DataError, check_int
from fingerprint_lm.metrics.bits import binomial_p_value, bonferroni
from fingerprint_lm.registry.codes import (
    as_bits,
    hamming_blocks,
    hamming_to_all,
    n_words,
    pack_bits,
    unpack_bits,
)

# Words of packed codes XOR-ed at once in a blocked search: bounds the temporary memory (~32 MiB).
_BLOCK_WORDS = 1 << 22


def hard_bits(bits, k: int) -> np.ndarray:
    """0/1 ``uint8`` bits from hard bits or soft outputs in [0, 1] (thresholded at 0.5)."""
    arr = np.asarray(bits)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError("extracted bits contain NaN or inf")
        arr = arr > 0.5
    return as_bits(arr, k)


def min_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """For each packed query row, its smallest Hamming distance to any packed code row (blocked)."""
    out = np.full(queries.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    if codes.shape[0] == 0 or queries.shape[0] == 0:
        return out
    for start, d in hamming_blocks(queries, codes, _BLOCK_WORDS):
        out[start : start + len(d)] = d.min(axis=1)
    return out


class CodeIndex:
    """In-memory bit-packed index of registered codes: nearest-code identification.

    Parameters:
        user_ids: the ``N`` user ids, in the order of ``packed``'s rows.
        packed: ``uint64 [N, ceil(k/64)]`` packed codes (:func:`pack_bits`).
        k: code length in bits.
    """

    def __init__(self, user_ids: Sequence[str], packed, k: int):
        self.k = check_int("code length", k)
        packed = np.ascontiguousarray(np.asarray(packed, dtype=np.uint64))
        if packed.ndim == 1 and packed.size == 0:
            packed = packed.reshape(0, n_words(self.k))
        if packed.ndim != 2 or packed.shape[1] != n_words(self.k):
            raise DataError(
                f"packed codes for k={self.k} need shape [N, {n_words(self.k)}], got {packed.shape}"
            )
        self.user_ids = list(user_ids)
        if len(self.user_ids) != packed.shape[0]:
            raise DataError(f"{len(self.user_ids)} user ids for {packed.shape[0]} codes")
        packed.setflags(write=False)
        self.packed = packed

    @classmethod
    def from_bits(cls, user_ids: Sequence[str], bits) -> CodeIndex:
        """Build an index from 0/1 codes ``[N, k]``."""
        arr = as_bits(bits)
        arr = arr.reshape(-1, arr.shape[-1])
        return cls(user_ids, pack_bits(arr), arr.shape[1])

    def __len__(self) -> int:
        return len(self.user_ids)

    def bits(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The codes of rows ``start:stop`` as 0/1 ``uint8 [n, k]``."""
        return unpack_bits(self.packed[start:stop], self.k).reshape(-1, self.k)

    def _result(self, best: int, dist: int, n_nearest: int, fpr: float) -> dict:
        n = len(self)
        if n == 0:
            return {
                "user_id": None,
                "nearest_user_id": None,
                "matching_bits": 0,
                "n_nearest": 0,
                "p_value": 1.0,
                "accused": False,
            }
        matches = self.k - int(dist)
        p = bonferroni(binomial_p_value(matches, self.k), n)
        accused = bool(p <= fpr)
        nearest = self.user_ids[best]
        return {
            "user_id": nearest if accused else None,
            "nearest_user_id": nearest,
            "matching_bits": matches,
            # more than one user at the smallest distance: the first registered is named
            "n_nearest": int(n_nearest),
            "p_value": float(p),
            "accused": accused,
        }

    def identify(self, bits, fpr: float = 1e-6) -> dict:
        """Name the registered user whose code is nearest to the extracted ``bits``.

        ``bits`` are 0/1 bits ``[k]`` or soft outputs in [0, 1] (thresholded at 0.5). The p-value
        is ``P[Binomial(k, 1/2) >= matching_bits]`` Bonferroni-corrected over the registry size;
        the nearest user is accused (``user_id`` set) only when it is ``<= fpr``.

        Returns:
            dict with ``user_id`` (accused user or None), ``nearest_user_id``, ``matching_bits``,
            ``n_nearest`` (users tied at the smallest distance), ``p_value``, ``accused``.
        """
        query = hard_bits(bits, self.k)
        if query.ndim != 1:
            raise DataError(f"identify takes one code [k]; use identify_many for {query.shape}")
        if len(self) == 0:
            return self._result(0, self.k, 0, fpr)
        dist = hamming_to_all(pack_bits(query), self.packed)
        best = int(np.argmin(dist))
        dmin = int(dist[best])
        return self._result(best, dmin, int(np.count_nonzero(dist == dmin)), fpr)

    def identify_many(self, bits, fpr: float = 1e-6) -> list[dict]:
        """:meth:`identify` for each row of ``bits`` ``[n, k]``, searched in blocks of queries."""
        queries = hard_bits(bits, self.k).reshape(-1, self.k)
        n = queries.shape[0]
        if len(self) == 0:
            return [self._result(0, self.k, 0, fpr) for _ in range(n)]
        best = np.empty(n, dtype=np.int64)
        dmin = np.empty(n, dtype=np.int64)
        ties = np.empty(n, dtype=np.int64)
        for start, d in hamming_blocks(pack_bits(queries), self.packed, _BLOCK_WORDS):
            b = np.argmin(d, axis=1)
            m = d[np.arange(d.shape[0]), b]
            best[start : start + len(d)] = b
            dmin[start : start + len(d)] = m
            ties[start : start + len(d)] = np.count_nonzero(d == m[:, None], axis=1)
        return [self._result(int(best[i]), int(dmin[i]), int(ties[i]), fpr) for i in range(n)]
