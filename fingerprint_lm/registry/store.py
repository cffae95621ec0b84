"""The user registry: one SQLite file mapping user ids to their fingerprint codes, and the
bit-packed nearest-code search that names the user behind an extracted fingerprint.

Schema::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- code_length, min_distance, schema_version
    users(user_id TEXT PRIMARY KEY, code BLOB UNIQUE, created TEXT, copy_sha256 TEXT, act_type TEXT)

``code`` is the packed code (:func:`~fingerprint_lm.registry.codes.pack_bits`, little-endian
``uint64`` words, zero padding), so the UNIQUE constraint is exactly "no two users share a code".

Concurrency: every write is one ``BEGIN IMMEDIATE`` transaction that takes SQLite's write lock
*before* reading, then re-checks every constraint (duplicate id, duplicate code, minimum distance)
against the rows committed so far, so several processes may register into the same file at once
without losing or duplicating a row. Waiting for the lock is bounded by ``timeout`` seconds. The
file uses SQLite's default rollback journal, not WAL, because WAL needs shared memory between
processes and does not work on network filesystems, where a cluster run may keep its registry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fingerprint_lm.errors import ConfigError, DataError, RegistryError
from fingerprint_lm.metrics.bits import binomial_p_value, bonferroni
from fingerprint_lm.registry.codes import (
    as_bits,
    draw_codes_min_distance,
    hamming_to_all,
    n_words,
    pack_bits,
    unpack_bits,
)

SCHEMA_VERSION = 1
# Words of packed codes XOR-ed at once in a blocked search: bounds the temporary memory (~32 MiB).
_BLOCK_WORDS = 1 << 22


def _hard_bits(bits, k: int) -> np.ndarray:
    """0/1 ``uint8`` bits from hard bits or soft outputs in [0, 1] (thresholded at 0.5)."""
    arr = np.asarray(bits)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError("extracted bits contain NaN or inf")
        arr = arr > 0.5
    return as_bits(arr, k)


def _min_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """For each packed query row, its smallest Hamming distance to any packed code row (blocked)."""
    out = np.full(queries.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    if codes.shape[0] == 0 or queries.shape[0] == 0:
        return out
    w = codes.shape[1]
    block = max(1, _BLOCK_WORDS // (codes.shape[0] * w))
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        d = np.bitwise_count(q[:, None, :] ^ codes[None, :, :]).sum(axis=2, dtype=np.int64)
        out[start : start + block] = d.min(axis=1)
    return out


class CodeIndex:
    """In-memory bit-packed index of registered codes: nearest-code identification.

    Parameters:
        user_ids: the ``N`` user ids, in the order of ``packed``'s rows.
        packed: ``uint64 [N, ceil(k/64)]`` packed codes (:func:`pack_bits`).
        k: code length in bits.
    """

    def __init__(self, user_ids: Sequence[str], packed, k: int):
        self.k = int(k)
        if self.k < 1:
            raise ConfigError(f"code length must be >= 1, got {k}")
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
        query = _hard_bits(bits, self.k)
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
        queries = _hard_bits(bits, self.k).reshape(-1, self.k)
        n = queries.shape[0]
        if len(self) == 0:
            return [self._result(0, self.k, 0, fpr) for _ in range(n)]
        qp = pack_bits(queries)
        w = self.packed.shape[1]
        best = np.empty(n, dtype=np.int64)
        dmin = np.empty(n, dtype=np.int64)
        ties = np.empty(n, dtype=np.int64)
        block = max(1, _BLOCK_WORDS // (len(self) * w))
        for start in range(0, n, block):
            q = qp[start : start + block]
            d = np.bitwise_count(q[:, None, :] ^ self.packed[None, :, :]).sum(axis=2, dtype=np.int32)
            b = np.argmin(d, axis=1)
            m = d[np.arange(d.shape[0]), b]
            best[start : start + block] = b
            dmin[start : start + block] = m
            ties[start : start + block] = np.count_nonzero(d == m[:, None], axis=1)
        return [self._result(int(best[i]), int(dmin[i]), int(ties[i]), fpr) for i in range(n)]


class Registry:
    """SQLite-backed registry of users and their fingerprint codes.

    Parameters:
        path: SQLite file (created if missing; its folder must exist).
        code_length: code length ``k`` in bits. Opening a registry created with another length
            raises :class:`RegistryError`.
        min_distance: smallest Hamming distance allowed between two registered codes (codes are
            always distinct). ``None``: the stored value for an existing registry, 0 for a new one;
            an explicit value that differs from the stored one raises :class:`RegistryError`.
        timeout: seconds to wait for another process's write lock before giving up.
        method: the fingerprinting method whose users this registry holds (``carrier``, ``pnm``):
            recorded by a new registry; opening one that recorded another raises
            :class:`RegistryError`. ``None`` checks nothing. ``.method`` is the recorded one.
    """

    def __init__(
        self, path: str | Path, code_length: int, min_distance: int | None = None, timeout: float = 30.0,
        method: str | None = None,
    ):
        self.path = str(path)
        self.method = method
        self.code_length = int(code_length)
        if self.code_length < 1:
            raise ConfigError(f"code length must be >= 1, got {code_length}")
        if min_distance is not None and not 0 <= int(min_distance) <= self.code_length:
            raise ConfigError(f"min_distance must lie in [0, {self.code_length}], got {min_distance}")
        self._index: CodeIndex | None = None
        self._index_version: int | None = None
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
        try:
            self.min_distance = self._init_schema(min_distance)
        except sqlite3.Error as exc:
            self._conn.close()
            raise RegistryError(f"{self.path} is not a usable registry: {exc}") from exc
        except RegistryError:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"registry {self.path} stayed locked: {exc}") from exc
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):
                raise RegistryError(f"registry constraint violated: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise RegistryError(f"registry {self.path}: {exc}") from exc
            raise
        finally:
            self._index = None  # our own commits do not change PRAGMA data_version

    def _init_schema(self, min_distance: int | None) -> int:
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, code BLOB NOT NULL UNIQUE, "
                "created TEXT NOT NULL, copy_sha256 TEXT, act_type TEXT)"
            )
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                if conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]:
                    raise RegistryError(f"{self.path} has users but no registry metadata")
                stored = 0 if min_distance is None else int(min_distance)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("code_length", str(self.code_length)),
                        ("min_distance", str(stored)),
                        ("schema_version", str(SCHEMA_VERSION)),
                        *([("method", self.method)] if self.method else []),
                    ],
                )
                return stored
            if int(meta.get("code_length", -1)) != self.code_length:
                raise RegistryError(
                    f"registry {self.path} holds {meta.get('code_length')}-bit codes, not {self.code_length}"
                )
            # registries made before methods existed (or without one) record none: not checked
            recorded = meta.get("method")
            if self.method is not None and recorded is not None and self.method != recorded:
                # another method's extractor reads nothing of these users' copies: refuse, do not
                # silently accuse nobody
                raise RegistryError(
                    f"registry {self.path} holds method={recorded} users, not method={self.method} "
                    f"(select method={recorded}, or use another distributor.registry)"
                )
            self.method = recorded or self.method
            stored = int(meta.get("min_distance", 0))
            if min_distance is not None and int(min_distance) != stored:
                raise RegistryError(
                    f"registry {self.path} was created with min_distance {stored}, not {min_distance}"
                )
            return stored

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def index(self) -> CodeIndex:
        """All registered codes as a :class:`CodeIndex` (registration order), cached until any
        connection writes to the file."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if self._index is not None and self._index_version == version:
            return self._index
        rows = self._conn.execute("SELECT user_id, code FROM users ORDER BY rowid").fetchall()
        w = n_words(self.code_length)
        blob = b"".join(r[1] for r in rows)
        if len(blob) != len(rows) * w * 8:
            raise RegistryError(f"registry {self.path} holds codes of the wrong size")
        packed = np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(len(rows), w)
        self._index = CodeIndex([r[0] for r in rows], packed, self.code_length)
        self._index_version = version
        return self._index

    def codes(self) -> tuple[list[str], np.ndarray]:
        """``(user_ids, packed codes uint64 [N, W])`` in registration order (array read-only)."""
        idx = self.index()
        return list(idx.user_ids), idx.packed

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def __contains__(self, user_id: object) -> bool:
        return self._conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None

    def list_users(self) -> list[str]:
        """User ids in registration order."""
        return [r[0] for r in self._conn.execute("SELECT user_id FROM users ORDER BY rowid")]

    def get(self, user_id: str) -> dict:
        """One user's row: ``user_id``, ``code`` (0/1 ``uint8 [k]``), ``created``, ``copy_sha256``,
        ``act_type``."""
        row = self._conn.execute(
            "SELECT user_id, code, created, copy_sha256, act_type FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            raise RegistryError(f"unknown user {user_id!r}")
        packed = np.frombuffer(row[1], dtype="<u8").astype(np.uint64)
        return {
            "user_id": row[0],
            "code": unpack_bits(packed, self.code_length),
            "created": row[2],
            "copy_sha256": row[3],
            "act_type": row[4],
        }

    # -- writing ----------------------------------------------------------------------------------

    def _prepare(self, rows: Iterable) -> tuple[list[tuple], np.ndarray]:
        """Validate rows (tuples ``(user_id, code[, copy_sha256[, act_type]])`` or mappings)."""
        ids, codes, shas, acts = [], [], [], []
        for row in rows:
            if isinstance(row, Mapping):
                uid, code = row["user_id"], row["code"]
                sha, act = row.get("copy_sha256"), row.get("act_type")
            else:
                row = tuple(row)
                if not 2 <= len(row) <= 4:
                    raise RegistryError(
                        f"a row is (user_id, code[, copy_sha256[, act_type]]), got {len(row)} items"
                    )
                uid, code, sha, act = (*row, None, None)[:4]
            if not isinstance(uid, str) or not uid:
                raise RegistryError(f"user id must be a non-empty string, got {uid!r}")
            for name, value in (("copy_sha256", sha), ("act_type", act)):
                if value is not None and not isinstance(value, str):
                    raise RegistryError(
                        f"{name} of {uid!r} must be a string or None, got {type(value).__name__}"
                    )
            try:
                bits = as_bits(code, self.code_length)
            except DataError as exc:
                raise RegistryError(f"code of {uid!r}: {exc}") from exc
            if bits.ndim != 1:
                raise RegistryError(f"code of {uid!r} must have shape [{self.code_length}], got {bits.shape}")
            ids.append(uid)
            codes.append(bits)
            shas.append(sha)
            acts.append(act)
        w = n_words(self.code_length)
        packed = pack_bits(np.stack(codes)) if codes else np.zeros((0, w), dtype=np.uint64)
        return list(zip(ids, shas, acts)), packed

    def _check_new(self, meta: list[tuple], packed: np.ndarray) -> None:
        """Raise RegistryError if a new row clashes with the file (read inside the write lock) or
        with an earlier new row. Vectorised over registered codes."""
        conn = self._conn
        seen: dict[str, int] = {}
        for j, (uid, _, _) in enumerate(meta):
            if uid in seen or conn.execute("SELECT 1 FROM users WHERE user_id = ?", (uid,)).fetchone():
                raise RegistryError(f"duplicate user {uid!r}")
            seen[uid] = j
        blobs = [p.astype("<u8").tobytes() for p in packed]
        first: dict[bytes, str] = {}
        for (uid, _, _), blob in zip(meta, blobs):
            if blob in first:
                raise RegistryError(f"user {uid!r} has the same code as {first[blob]!r}")
            owner = conn.execute("SELECT user_id FROM users WHERE code = ?", (blob,)).fetchone()
            if owner:
                raise RegistryError(f"user {uid!r} has the same code as registered user {owner[0]!r}")
            first[blob] = uid
        if self.min_distance <= 1:
            return  # distinct codes were checked above
        existing = self.index()
        to_old = _min_distances(packed, existing.packed)
        bad = np.flatnonzero(to_old < self.min_distance)
        if bad.size:
            j = int(bad[0])
            owner = existing.user_ids[int(np.argmin(hamming_to_all(packed[j], existing.packed)))]
            raise RegistryError(
                f"code of {meta[j][0]!r} is at distance {to_old[j]} from {owner!r} (< min_distance {self.min_distance})"
            )
        for j in range(1, packed.shape[0]):
            d = hamming_to_all(packed[j], packed[:j])
            i = int(np.argmin(d))
            if d[i] < self.min_distance:
                raise RegistryError(
                    f"code of {meta[j][0]!r} is at distance {d[i]} from {meta[i][0]!r} "
                    f"(< min_distance {self.min_distance})"
                )

    def _insert(self, meta: list[tuple], packed: np.ndarray) -> None:
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._conn.executemany(
            "INSERT INTO users (user_id, code, created, copy_sha256, act_type) VALUES (?, ?, ?, ?, ?)",
            [(uid, p.astype("<u8").tobytes(), created, sha, act) for (uid, sha, act), p in zip(meta, packed)],
        )

    def register(
        self, user_id: str, code, copy_sha256: str | None = None, act_type: str | None = None
    ) -> None:
        """Register one user with a 0/1 code ``[k]``. A duplicate id, a duplicate code or a code
        closer than ``min_distance`` to a registered one raises RegistryError; nothing is written."""
        self.register_many([(user_id, code, copy_sha256, act_type)])

    def register_many(self, rows: Iterable) -> int:
        """Register many users in one transaction: all rows or none. ``rows``: tuples
        ``(user_id, code[, copy_sha256[, act_type]])`` or mappings with those keys. Returns the
        number of rows written."""
        meta, packed = self._prepare(rows)
        if not meta:
            return 0
        with self._write():
            self._check_new(meta, packed)
            self._insert(meta, packed)
        return len(meta)

    def new_code(self, rng: np.random.Generator) -> np.ndarray:
        """A random code at distance >= ``max(1, min_distance)`` from every registered code.

        Another process may take a clashing code before this one is registered; :meth:`register`
        re-checks, and :meth:`register_new` draws and registers under one lock."""
        return draw_codes_min_distance(
            1, self.code_length, self.min_distance, rng, existing=self.index().packed
        )[0]

    def register_new(
        self,
        user_id: str,
        rng: np.random.Generator,
        copy_sha256: str | None = None,
        act_type: str | None = None,
    ) -> np.ndarray:
        """Draw a valid code and register it for ``user_id`` under one write lock; returns the code."""
        meta, _ = self._prepare([(user_id, np.zeros(self.code_length, np.uint8), copy_sha256, act_type)])
        with self._write():
            code = draw_codes_min_distance(
                1, self.code_length, self.min_distance, rng, existing=self.index().packed
            )[0]
            packed = pack_bits(code[None])
            self._check_new(meta, packed)
            self._insert(meta, packed)
        return code

    # -- identification ---------------------------------------------------------------------------

    def identify(self, bits, fpr: float = 1e-6) -> dict:
        """:meth:`CodeIndex.identify` over the registered codes (p-value corrected over ``len(self)``)."""
        return self.index().identify(bits, fpr)

    def identify_many(self, bits, fpr: float = 1e-6) -> list[dict]:
        """:meth:`CodeIndex.identify_many` over the registered codes."""
        return self.index().identify_many(bits, fpr)
