"""The user registry: one SQLite file mapping user ids to their fingerprint codes (the nearest-code
search over them is :class:`~fingerprint_lm.registry.index.CodeIndex`).

Schema::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- code_length, min_distance, schema_version,
                                                    -- method; screened_users, screened_draws
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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fingerprint_lm.errors import ConfigError, DataError, RegistryError, check_int
from fingerprint_lm.registry.codes import (
    as_bits,
    draw_codes_min_distance,
    hamming_to_all,
    n_words,
    pack_bits,
    unpack_bits,
)
from fingerprint_lm.registry.index import CodeIndex, min_distances

SCHEMA_VERSION = 1
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
        self.code_length = check_int("code length", code_length)
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
        to_old = min_distances(packed, existing.packed)
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
        self, user_id: str, code, copy_sha256: str | None = None, act_type: str | None = None,
        screened_draws: int | None = None,
    ) -> None:
        """Register one user with a 0/1 code ``[k]``. A duplicate id, a duplicate code or a code
        closer than ``min_distance`` to a registered one raises RegistryError; nothing is written.
        ``screened_draws``: the code was screened and took that many draws (:meth:`register_many`)."""
        self.register_many([(user_id, code, copy_sha256, act_type)], screened_draws)

    def register_many(self, rows: Iterable, screened_draws: int | None = None) -> int:
        """Register many users in one transaction: all rows or none. ``rows``: tuples
        ``(user_id, code[, copy_sha256[, act_type]])`` or mappings with those keys. Returns the
        number of rows written. ``screened_draws``: every row's code was kept by a screen (a draw
        passes or is drawn again) that drew this many codes for them in all; counted in the same
        transaction, for :meth:`screen_pass_rate`."""
        meta, packed = self._prepare(rows)
        if not meta:
            return 0
        if screened_draws is not None and (not isinstance(screened_draws, int | np.integer)
                                           or isinstance(screened_draws, bool) or screened_draws < len(meta)):
            raise RegistryError(f"screened_draws must be an int >= the rows registered ({len(meta)}), "
                                f"got {screened_draws!r}")
        with self._write() as conn:
            self._check_new(meta, packed)
            self._insert(meta, packed)
            if screened_draws is not None:
                counts = self._screen_counts()
                conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [("screened_users", str(counts[0] + len(meta))),
                                  ("screened_draws", str(counts[1] + int(screened_draws)))])
        return len(meta)

    def _screen_counts(self) -> tuple[int, int]:
        meta = dict(self._conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('screened_users', 'screened_draws')").fetchall())
        return int(meta.get("screened_users", 0)), int(meta.get("screened_draws", 0))

    def screen_pass_rate(self) -> float | None:
        """The share of drawn codes that passed the screen, over every screened registration
        (registered users / codes drawn for them); None when no code was screened.

        Attribution's exact bound treats an innocent's code as uniform. A screened code is uniform
        *given that it passes*, so for any set ``A`` of codes ``P[screened code in A] <= P[uniform
        code in A] / pass rate``: dividing the p-values by this rate (testing at ``fpr x rate``)
        keeps the bound for a registry of screened codes (``distributor/attribution.py``). Pooled
        over registrations, it bounds the registry-wide (Bonferroni-sum) rate when screens differ.
        An estimate: a registry of few screened users may read it above the screen's true rate
        (the checkpoint's fit, ``issue_screen.pass_rate``, is a second estimate to compare)."""
        users, draws = self._screen_counts()
        return users / draws if users else None

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


def open_registry(path: str | Path, code_length: int, min_distance: int | None = None,
                  create: bool = False, method: str | None = None) -> Registry:
    """Open the registry file; only ``create=True`` (issuing) may make a new one. ``method``
    (the checkpoint's): a registry of another method's users is refused."""
    path = Path(path)
    if not path.is_file():
        if not create:
            raise RegistryError(f"no registry at {path} (issue a copy first: task=issue user_id=NAME)")
        path.parent.mkdir(parents=True, exist_ok=True)
    return Registry(path, code_length, min_distance=min_distance, method=method)
