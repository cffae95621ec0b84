"""Codes, the SQLite registry (including concurrent writers) and identification (bit statistics:
tests/test_bits.py)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import sys

import numpy as np
import pytest

from fingerprint_lm.errors import ConfigError, DataError, RegistryError
from fingerprint_lm.metrics.bits import binomial_p_value
from fingerprint_lm.registry.codes import (
    draw_code,
    draw_codes_min_distance,
    hamming_to_all,
    pack_bits,
    unpack_bits,
)
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.store import Registry

K = 48


def _pairwise_min(bits: np.ndarray) -> int:
    d = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    np.fill_diagonal(d, bits.shape[1] + 1)
    return int(d.min())


# -- codes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [32, 48, 64, 100, 256])
def test_pack_unpack_round_trip(k):
    rng = np.random.default_rng(k)
    bits = rng.integers(0, 2, size=(7, k), dtype=np.uint8)
    packed = pack_bits(bits)
    assert packed.dtype == np.uint64 and packed.shape == (7, -(-k // 64))
    np.testing.assert_array_equal(unpack_bits(packed, k), bits)
    one = pack_bits(bits[3].astype(bool))
    assert one.shape == (-(-k // 64),)
    np.testing.assert_array_equal(one, packed[3])
    np.testing.assert_array_equal(unpack_bits(one, k), bits[3])
    # padding bits stay zero, so equal codes have equal words
    ones = pack_bits(np.ones(k, dtype=np.uint8))
    assert int(np.bitwise_count(ones).sum()) == k


def test_pack_layout_bit_j_is_word_j_div_64():
    bits = np.zeros(100, dtype=np.uint8)
    bits[70] = 1
    packed = pack_bits(bits)
    assert packed.tolist() == [0, 1 << 6]


def test_pack_rejects_non_binary():
    with pytest.raises(DataError):
        pack_bits(np.array([0, 1, 2]))
    with pytest.raises(DataError):
        pack_bits(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("k", [32, 48, 64, 100, 256])
def test_hamming_equals_naive_count(k):
    rng = np.random.default_rng(1000 + k)
    codes = rng.integers(0, 2, size=(300, k), dtype=np.uint8)
    query = draw_code(k, rng)
    expected = (codes != query).sum(axis=1)
    np.testing.assert_array_equal(hamming_to_all(pack_bits(query), pack_bits(codes)), expected)


def test_draw_codes_min_distance_respects_existing_and_each_other():
    rng = np.random.default_rng(2)
    existing = draw_codes_min_distance(40, K, 14, rng)
    assert _pairwise_min(existing) >= 14
    new = draw_codes_min_distance(40, K, 14, rng, existing=pack_bits(existing))
    assert _pairwise_min(np.concatenate([existing, new])) >= 14


def test_draw_codes_min_distance_gives_up():
    # at most 4 codes of 8 bits can be pairwise >= 5 apart (Plotkin)
    with pytest.raises(RegistryError, match="after"):
        draw_codes_min_distance(10, 8, 5, np.random.default_rng(0), max_tries=200)
    with pytest.raises(RegistryError):
        draw_codes_min_distance(1, 8, 9, np.random.default_rng(0))


# -- registry -------------------------------------------------------------------------------------


def _count_rows(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]


@pytest.fixture
def reg(tmp_path):
    registry = Registry(tmp_path / "reg.sqlite", K, min_distance=8)
    yield registry
    registry.close()


def test_register_get_list(reg):
    rng = np.random.default_rng(3)
    code_a, code_b = reg.new_code(rng), reg.new_code(rng)
    reg.register("alice", code_a, copy_sha256="ab" * 32, act_type="perm+scale")
    reg.register("bob", code_b)
    assert len(reg) == 2 and reg.list_users() == ["alice", "bob"] and "alice" in reg
    row = reg.get("alice")
    np.testing.assert_array_equal(row["code"], code_a)
    assert row["copy_sha256"] == "ab" * 32 and row["act_type"] == "perm+scale" and row["created"]
    assert reg.get("bob")["act_type"] is None
    ids, packed = reg.codes()
    assert ids == ["alice", "bob"]
    np.testing.assert_array_equal(packed, pack_bits(np.stack([code_a, code_b])))
    with pytest.raises(RegistryError, match="unknown user 'carol'"):
        reg.get("carol")


def test_registry_persists_and_checks_code_length(tmp_path):
    path = tmp_path / "reg.sqlite"
    with Registry(path, K, min_distance=6) as reg:
        reg.register("alice", draw_code(K, np.random.default_rng(0)))
    with Registry(path, K) as again:  # min_distance read back from the file
        assert again.list_users() == ["alice"] and again.min_distance == 6
    with pytest.raises(RegistryError, match="48-bit"):
        Registry(path, 64)
    with pytest.raises(RegistryError, match="min_distance"):
        Registry(path, K, min_distance=0)
    with pytest.raises(ConfigError):
        Registry(tmp_path / "other.sqlite", 0)


def test_not_a_registry(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(RegistryError):
        Registry(junk, K)


def test_errors_leave_registry_unchanged(reg):
    rng = np.random.default_rng(4)
    code = reg.new_code(rng)
    reg.register("alice", code)
    path = reg.path
    before_rows, before_users = _count_rows(path), reg.list_users()

    near = code.copy()
    near[:3] ^= 1  # distance 3 < min_distance 8
    bad_calls = [
        (lambda: reg.register("alice", reg.new_code(rng)), "duplicate user 'alice'"),
        (lambda: reg.register("bob", code), "same code"),
        (lambda: reg.register("bob", near), "distance 3"),
        (lambda: reg.register("bob", np.ones(K + 1, np.uint8)), "bits"),
        (lambda: reg.register("", reg.new_code(rng)), "non-empty"),
    ]
    ok1, ok2 = reg.new_code(rng), None
    while ok2 is None or (ok1 != ok2).sum() < 8:
        ok2 = draw_code(K, rng)
    bad_calls += [
        # a good row, then a clash: the batch is all or nothing
        (lambda: reg.register_many([("carol", ok1), ("dave", near)]), "distance"),
        (lambda: reg.register_many([("carol", ok1), ("carol", ok2)]), "duplicate user 'carol'"),
        (lambda: reg.register_many([("carol", ok1), ("dave", ok1)]), "same code"),
    ]
    for call, message in bad_calls:
        with pytest.raises(RegistryError, match=message):
            call()
        assert _count_rows(path) == before_rows and reg.list_users() == before_users
    assert reg.register_many([("carol", ok1), ("dave", ok2)]) == 2
    assert _count_rows(path) == before_rows + 2


def test_min_distance_zero_still_requires_distinct_codes(tmp_path):
    with Registry(tmp_path / "r.sqlite", K) as reg:
        code = draw_code(K, np.random.default_rng(5))
        near = code.copy()
        near[0] ^= 1
        reg.register("a", code)
        reg.register("b", near)  # distance 1 is fine at min_distance 0
        with pytest.raises(RegistryError, match="same code"):
            reg.register("c", code)
        assert len(reg) == 2


def test_new_code_respects_min_distance(tmp_path):
    rng = np.random.default_rng(6)
    with Registry(tmp_path / "r.sqlite", K, min_distance=16) as reg:
        for i in range(30):
            reg.register(f"u{i}", reg.new_code(rng))
        reg.register_new("last", rng, act_type="perm")
        ids, packed = reg.codes()
        assert len(ids) == 31
        assert _pairwise_min(unpack_bits(packed, K)) >= 16


def test_register_many_vectorised_check(tmp_path):
    rng = np.random.default_rng(7)
    codes = draw_codes_min_distance(2000, K, 8, rng)
    with Registry(tmp_path / "r.sqlite", K, min_distance=8) as reg:
        reg.register_many([(f"u{i}", c) for i, c in enumerate(codes[:1500])])
        reg.register_many(
            [{"user_id": f"u{i}", "code": c, "act_type": "x"} for i, c in enumerate(codes[1500:], 1500)]
        )
        assert len(reg) == 2000 and reg.get("u1999")["act_type"] == "x"
        clash = codes[10].copy()
        clash[:4] ^= 1
        with pytest.raises(RegistryError, match="'u10'"):
            reg.register_many([("new1", draw_code(K, rng)), ("new2", clash)])
        assert len(reg) == 2000


def test_codes_cache_sees_other_connections(tmp_path):
    path = tmp_path / "r.sqlite"
    rng = np.random.default_rng(8)
    with Registry(path, K) as a, Registry(path, K) as b:
        a.register("x", draw_code(K, rng))
        assert a.codes()[0] == ["x"] and b.codes()[0] == ["x"]
        b.register("y", draw_code(K, rng))
        assert a.codes()[0] == ["x", "y"]
        code_z = draw_code(K, rng)
        b.register("z", code_z)
        assert a.identify(code_z)["user_id"] == "z"


# -- concurrency ----------------------------------------------------------------------------------


def _register_distinct(path, worker, n, barrier, queue):
    rng = np.random.default_rng(100 + worker)
    with Registry(path, K, min_distance=4) as reg:
        barrier.wait()
        for i in range(n):
            reg.register(f"w{worker}-{i}", reg.new_code(rng))
    queue.put(worker)


def _register_same(path, worker, barrier, queue):
    rng = np.random.default_rng(200 + worker)
    with Registry(path, K) as reg:
        barrier.wait()
        try:
            reg.register("alice", draw_code(K, rng), act_type=f"w{worker}")
            queue.put("ok")
        except RegistryError as exc:
            queue.put(str(exc))


def _run_processes(target, args_per_worker):
    # fork on Linux: spawn would re-import pytest and numpy in each child (~5 s on 2 cores)
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    barrier, queue = ctx.Barrier(len(args_per_worker)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue)) for args in args_per_worker]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_concurrent_distinct_registrations(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Registry(path, K, min_distance=4).close()
    n_workers, n_each = 4, 40
    done = _run_processes(_register_distinct, [(path, w, n_each) for w in range(n_workers)])
    assert sorted(done) == list(range(n_workers))
    with Registry(path, K) as reg:
        users = reg.list_users()
        ids, packed = reg.codes()
    expected = {f"w{w}-{i}" for w in range(n_workers) for i in range(n_each)}
    assert len(users) == n_workers * n_each and set(users) == expected
    assert len({row.tobytes() for row in packed}) == len(ids)
    assert _pairwise_min(unpack_bits(packed, K)) >= 4


def test_concurrent_same_user_exactly_one_wins(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Registry(path, K).close()
    results = _run_processes(_register_same, [(path, w) for w in range(4)])
    assert results.count("ok") == 1
    assert all("duplicate user 'alice'" in r for r in results if r != "ok")
    assert _count_rows(path) == 1


# -- identification -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def population():
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2, size=(500, K), dtype=np.uint8)
    return [f"user{i}" for i in range(500)], bits


def test_identify_with_flipped_bits(tmp_path, population):
    ids, bits = population
    rng = np.random.default_rng(10)
    with Registry(tmp_path / "r.sqlite", K) as reg:
        reg.register_many(zip(ids, bits))
        for target in (0, 123, 499):
            query = bits[target].copy()
            query[rng.choice(K, 3, replace=False)] ^= 1
            res = reg.identify(query, fpr=1e-6)
            assert res["user_id"] == ids[target] and res["accused"]
            assert res["matching_bits"] == K - 3
            assert res["p_value"] == pytest.approx(500 * binomial_p_value(K - 3, K))
        # soft outputs are thresholded at 0.5
        soft = np.where(bits[7] == 1, 0.8, 0.3)
        assert reg.identify(soft)["user_id"] == ids[7]


def test_identify_accuses_nobody_for_random_bits(population):
    ids, bits = population
    index = CodeIndex.from_bits(ids, bits)
    queries = np.random.default_rng(11).integers(0, 2, size=(200, K))
    results = index.identify_many(queries, fpr=1e-6)
    assert not any(r["accused"] for r in results)
    assert all(r["user_id"] is None and r["nearest_user_id"] in ids for r in results)
    assert min(r["p_value"] for r in results) > 1e-6
    # identify_many agrees with identify
    for q, r in zip(queries[:20], results[:20]):
        assert index.identify(q, fpr=1e-6) == r


def test_identify_many_blocks_and_ties(population):
    ids, bits = population
    index = CodeIndex.from_bits(ids, bits)
    queries = bits[[5, 6, 7]]
    results = index.identify_many(queries)
    assert [r["user_id"] for r in results] == ["user5", "user6", "user7"]
    assert all(r["matching_bits"] == K and r["n_nearest"] == 1 for r in results)
    tied = CodeIndex.from_bits(["a", "b"], np.array([[0, 0, 1, 1], [0, 0, 0, 0]]))
    res = tied.identify(np.array([0, 0, 1, 0]), fpr=0.9)
    assert res["n_nearest"] == 2 and res["nearest_user_id"] == "a"


def test_identify_empty_registry(tmp_path):
    with Registry(tmp_path / "r.sqlite", K) as reg:
        res = reg.identify(np.zeros(K, np.uint8))
    assert res["user_id"] is None and not res["accused"] and res["p_value"] == 1.0
    with pytest.raises(DataError):
        CodeIndex.from_bits(["a"], np.zeros((1, K), np.uint8)).identify(np.zeros(K + 1, np.uint8))
