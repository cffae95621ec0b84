"""Fingerprint codes: drawing them, packing them into 64-bit words, Hamming search.

A code of ``k`` bits is packed into ``ceil(k / 64)`` little-endian ``uint64`` words: bit ``j`` of the
code is bit ``j % 64`` of word ``j // 64``. The padding bits of the last word are always zero, so
two codes are equal exactly when their packed words are equal (the registry relies on that for its
UNIQUE constraint on the packed blob).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fingerprint_lm.errors import DataError, RegistryError, check_int

WORD_BITS = 64


def n_words(k: int) -> int:
    """Number of ``uint64`` words that hold a ``k``-bit code."""
    return -(-int(k) // WORD_BITS)


def draw_code(k: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random ``k``-bit code as a ``uint8`` 0/1 array of shape ``[k]``."""
    return rng.integers(0, 2, size=check_int("code length", k, error=DataError), dtype=np.uint8)


def as_bits(bits, k: int | None = None) -> np.ndarray:
    """Validate a 0/1 (or bool) array ``[k]`` or ``[N, k]`` and return it as ``uint8``."""
    arr = np.asarray(bits)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise DataError(f"bits must have shape [k] or [N, k] with k >= 1, got {arr.shape}")
    if k is not None and arr.shape[-1] != k:
        raise DataError(f"expected {k} bits, got {arr.shape[-1]}")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"bits must be numeric or bool, got dtype {arr.dtype}")
        if not np.all((arr == 0) | (arr == 1)):
            raise DataError("bits must be 0 or 1 (threshold soft outputs first)")
    return arr.astype(np.uint8, copy=False)


def pack_bits(bits) -> np.ndarray:
    """Pack 0/1 bits into ``uint64`` words.

    Parameters:
        bits: bool or 0/1 array of shape ``[N, k]`` or ``[k]``.

    Returns:
        ``uint64`` array ``[N, ceil(k/64)]`` (``[ceil(k/64)]`` for a single code).
    """
    arr = as_bits(bits)
    single = arr.ndim == 1
    arr = np.atleast_2d(arr)
    n, k = arr.shape
    w = n_words(k)
    if k != w * WORD_BITS:
        padded = np.zeros((n, w * WORD_BITS), dtype=np.uint8)
        padded[:, :k] = arr
        arr = padded
    packed = np.packbits(arr, axis=1, bitorder="little")  # [n, 8w] bytes
    words = np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)
    return words[0] if single else words


def unpack_bits(packed, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``uint8`` 0/1 array ``[N, k]`` (``[k]`` for one code)."""
    words = np.asarray(packed)
    single = words.ndim == 1
    words = np.atleast_2d(words)
    if words.ndim != 2 or words.shape[1] != n_words(k):
        raise DataError(f"packed codes for k={k} need {n_words(k)} words per row, got shape {words.shape}")
    as_bytes = np.ascontiguousarray(words.astype("<u8", copy=False)).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=1, count=int(k), bitorder="little")
    return bits[0] if single else bits


def hamming_to_all(query_packed, codes_packed) -> np.ndarray:
    """Hamming distance from one packed code ``[W]`` to every row of ``codes_packed`` ``[N, W]``.

    XOR then popcount (``np.bitwise_count``), vectorised over users. Returns ``int64 [N]``.
    """
    q = np.asarray(query_packed, dtype=np.uint64).reshape(-1)
    codes = np.asarray(codes_packed, dtype=np.uint64)
    if codes.ndim != 2 or codes.shape[1] != q.shape[0]:
        raise DataError(f"query has {q.shape[0]} words but codes have shape {codes.shape}")
    if codes.shape[1] == 1:  # the common k <= 64 case: skip the row sum
        return np.bitwise_count(codes[:, 0] ^ q[0]).astype(np.int64)
    return np.bitwise_count(codes ^ q).sum(axis=1, dtype=np.int64)


def hamming_blocks(queries_packed, codes_packed, max_elements: int = 1 << 24) -> Iterator[tuple[int, np.ndarray]]:
    """Hamming distances between blocks of query rows and every code row: yields ``(start,
    int32 [b, N])`` for queries ``start:start + b``, with at most ``max_elements`` words XOR-ed at
    once (the project's one blocked search: :func:`hamming_matrix`, nearest-code identification,
    soft-decision identification)."""
    queries = np.atleast_2d(np.asarray(queries_packed, dtype=np.uint64))
    codes = np.asarray(codes_packed, dtype=np.uint64)
    if codes.ndim != 2 or codes.shape[1] != queries.shape[1]:
        raise DataError(f"queries have shape {queries.shape} but codes have shape {codes.shape}")
    block = max(1, max_elements // max(1, codes.shape[0] * queries.shape[1]))
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        yield start, np.bitwise_count(q[:, None, :] ^ codes[None, :, :]).sum(axis=2, dtype=np.int32)


def hamming_matrix(queries_packed, codes_packed, max_elements: int = 1 << 24) -> np.ndarray:
    """Hamming distances ``int32 [n, N]`` between each query row and each code row.

    Computed in blocks of queries so that at most ``max_elements`` words are held at once.
    """
    queries = np.atleast_2d(np.asarray(queries_packed, dtype=np.uint64))
    out = np.empty((queries.shape[0], np.shape(codes_packed)[0]), dtype=np.int32)
    for start, distances in hamming_blocks(queries, codes_packed, max_elements):
        out[start : start + len(distances)] = distances
    return out


def packed_dot(packed, k: int, weights: np.ndarray, rows: np.ndarray | None = None,
               chunk: int = 1 << 18) -> np.ndarray:
    """``codes @ weights`` for packed codes (``rows`` of them, or all), without unpacking: for
    byte ``j`` of a code, ``table[j, b]`` is the sum of ``weights`` over the bits set in byte value
    ``b``, so a code costs ``ceil(k / 8)`` lookups, summed byte by byte in order; ``chunk`` codes at
    a time (memory stays flat at long codes). Integer weights give exact integer sums."""
    weights = np.asarray(weights)
    n_bytes = -(-int(k) // 8)
    padded = np.zeros(8 * n_bytes, dtype=weights.dtype)
    padded[:k] = weights
    byte_bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # [256, 8]
    table = padded.reshape(n_bytes, 8) @ byte_bits.T.astype(weights.dtype)  # [n_bytes, 256]
    packed = np.asarray(packed, dtype=np.uint64)
    n = len(packed) if rows is None else len(rows)
    out = np.zeros(n, dtype=table.dtype)
    for start in range(0, n, chunk):
        codes = packed[start : start + chunk] if rows is None else packed[rows[start : start + chunk]]
        code_bytes = codes.astype("<u8", copy=False).view(np.uint8)  # [c, 8 W], little-endian
        for j in range(n_bytes):
            out[start : start + len(codes)] += table[j][code_bytes[:, j]]
    return out


def draw_codes_min_distance(
    n: int,
    k: int,
    min_distance: int,
    rng: np.random.Generator,
    existing=None,
    max_tries: int = 1000,
) -> np.ndarray:
    """Draw ``n`` random ``k``-bit codes, each at Hamming distance >= ``min_distance`` from the
    ``existing`` packed codes and from each other (rejection sampling).

    ``min_distance <= 1`` only asks for distinct codes (distance >= 1 from everything). Each new code
    is checked against all codes so far in one vectorised call; a code that cannot be placed in
    ``max_tries`` draws raises :class:`RegistryError` (the code space is too full for that distance).

    Returns:
        ``uint8`` 0/1 array ``[n, k]``.
    """
    n, k, min_distance = int(n), check_int("code length", k, error=DataError), max(1, int(min_distance))
    if min_distance > k:
        raise RegistryError(f"min_distance {min_distance} exceeds the code length {k}")
    w = n_words(k)
    old = np.zeros((0, w), dtype=np.uint64) if existing is None else np.asarray(existing, dtype=np.uint64)
    if old.ndim != 2 or old.shape[1] != w:
        raise DataError(f"existing codes for k={k} need shape [M, {w}], got {old.shape}")
    pool = np.empty((old.shape[0] + n, w), dtype=np.uint64)
    pool[: old.shape[0]] = old
    filled = old.shape[0]
    out = np.empty((n, k), dtype=np.uint8)
    batch = 16  # candidates drawn per rng call; most are accepted at once
    for j in range(n):
        for _ in range(-(-max_tries // batch)):
            cands = rng.integers(0, 2, size=(batch, k), dtype=np.uint8)
            packed = pack_bits(cands)
            for c in range(batch):
                if filled == 0 or hamming_to_all(packed[c], pool[:filled]).min() >= min_distance:
                    break
            else:
                continue
            out[j] = cands[c]
            pool[filled] = packed[c]
            filled += 1
            break
        else:
            raise RegistryError(
                f"no {k}-bit code at distance >= {min_distance} from {filled} codes after {max_tries} tries"
            )
    return out
