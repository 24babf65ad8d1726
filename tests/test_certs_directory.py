"""certs/directory.py: the file backend of Storage, on real files in tmp_path."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniport.certs import directory
from sniport.certs.directory import DirectoryStorage, cert_id
from sniport.certs.storage import Storage, StorageError
from sniport.wire.acme import Challenge, tls_alpn01_certificate

URL = "https://acme.example/directory"
NAMES = ["b.example.com", "a.example.com", "*.example.com"]
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mode) for p in root.rglob("*"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pair(name: str = "a.example.com") -> tuple[bytes, bytes]:
    # Any self-signed leaf with its key will do; this builder is already at hand.
    return tls_alpn01_certificate(name, "x.y")


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStorage:
    return DirectoryStorage(str(tmp_path / "acme"))


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory, "_READ_RETRIES", (0.001, 0.001))


def test_it_is_a_storage(store: DirectoryStorage) -> None:
    s: Storage = store
    assert s.description == store.path


# --- ids -------------------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_name = st.builds(
    lambda labels, wild: ("*." if wild else "") + ".".join(labels),
    st.lists(_label, min_size=1, max_size=4),
    st.booleans(),
)


@given(st.lists(_name, min_size=1, max_size=5), st.randoms())
def test_id_ignores_order_and_duplicates(names: list[str], rnd: object) -> None:
    shuffled = names + names[:1]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert cert_id(shuffled) == cert_id(names)


@given(st.lists(_name, min_size=1, max_size=5), st.lists(_name, min_size=1, max_size=5))
def test_distinct_name_sets_distinct_ids(a: list[str], b: list[str]) -> None:
    if set(a) != set(b):
        assert cert_id(a) != cert_id(b)


@given(st.lists(_name, min_size=1, max_size=5))
def test_id_is_a_safe_path_component(names: list[str]) -> None:
    ident = cert_id(names)
    assert ident not in (".", "..") and "/" not in ident and "*" not in ident
    assert len(ident) <= 255
    assert set(ident) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-_")


def test_id_of_a_longest_name_fits_name_max() -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(longest) == 253
    assert len(cert_id(["*." + longest[2:]])) <= 255


@pytest.mark.parametrize(
    "names", [[], ["../x"], ["a/b"], ["A.example"], [""], ["."], ["a..b"], ["-a.b"], ["a.*.b"]]
)
def test_id_refuses_what_is_not_a_name(names: list[str]) -> None:
    with pytest.raises(ValueError):
        cert_id(names)


# --- no I/O where none is allowed ---------------------------------------------------------------


def test_constructor_readers_and_problem_create_nothing(tmp_path: Path) -> None:
    before = listing(tmp_path)
    s = DirectoryStorage(str(tmp_path / "acme" / "deeper"))
    assert s.http01(TOKEN) is None
    assert s.tls_alpn01("a.example.com") is None
    assert s.problem() is None
    assert s.certificate_version(NAMES) is None
    assert s.load_certificate(NAMES) is None
    assert listing(tmp_path) == before == []


def test_readers_on_an_existing_store_change_nothing(store: DirectoryStorage) -> None:
    store.ensure()
    root = Path(store.path)
    before = listing(root)
    assert store.http01(TOKEN) is None and store.tls_alpn01("a.example.com") is None
    assert store.problem() is None
    assert listing(root) == before


# --- layout and problem() ------------------------------------------------------------------------


def test_ensure_makes_the_layout_with_its_modes(store: DirectoryStorage) -> None:
    old = os.umask(0o077)  # the modes must not depend on it
    try:
        store.ensure()
    finally:
        os.umask(old)
    root = Path(store.path)
    expected = {
        "": 0o755,
        "accounts": 0o700,
        "certificates": 0o700,
        "challenges": 0o755,
        "challenges/http-01": 0o755,
        "challenges/tls-alpn-01": 0o755,
        "locks": 0o700,
    }
    assert {rel: mode(root / rel) for rel in expected} == expected


def test_ensure_under_a_file_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    s = DirectoryStorage(str(tmp_path / "file" / "acme"))
    with pytest.raises(StorageError, match=r"cannot create .*file/acme"):
        s.ensure()


@pytest.mark.parametrize(
    ("setup", "rel", "expect"),
    [
        ("nothing", "acme", None),
        ("nothing", "a/b/c/acme", None),
        ("file", "file", "is not a directory"),
        ("file", "file/acme", "file is not a directory"),
        ("file", "file/x/y/acme", "file is not a directory"),
        ("dir with file for accounts", "acme", "accounts is not a directory"),
    ],
)
def test_problem(tmp_path: Path, setup: str, rel: str, expect: str | None) -> None:
    if setup == "file":
        (tmp_path / "file").write_text("x")
    elif setup == "dir with file for accounts":
        (tmp_path / "acme").mkdir()
        (tmp_path / "acme" / "accounts").write_text("x")
    s = DirectoryStorage(str(tmp_path / rel))
    before = listing(tmp_path)
    problem = s.problem()
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem
    assert listing(tmp_path) == before  # check must not change the disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode")
def test_problem_read_only_directory(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir(mode=0o555)
    problem = DirectoryStorage(str(tmp_path / "acme")).problem()
    assert problem is not None and "not writable" in problem


# --- account keys ----------------------------------------------------------------------------


def test_account_key_is_made_once_and_kept(store: DirectoryStorage) -> None:
    key = store.account_key(URL)
    again = DirectoryStorage(store.path).account_key(URL)
    assert again.private_numbers() == key.private_numbers()
    files = list((Path(store.path) / "accounts").iterdir())
    assert [mode(f) for f in files] == [0o600]
    assert files[0].name.endswith(".key") and len(files[0].name) == 16 + 4
    other = store.account_key(URL + "/other")
    assert other.private_numbers() != key.private_numbers()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"x" * 2_000_000,
    ],
)
def test_corrupt_account_key_raises_and_is_kept(store: DirectoryStorage, content: bytes) -> None:
    store.account_key(URL)
    (path,) = (Path(store.path) / "accounts").iterdir()
    path.write_bytes(content)
    with pytest.raises(StorageError, match=path.name):
        DirectoryStorage(store.path).account_key(URL)
    assert path.read_bytes() == content


def test_account_key_of_another_curve_is_refused(store: DirectoryStorage) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    store.account_key(URL)
    (path,) = (Path(store.path) / "accounts").iterdir()
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(p384)
    with pytest.raises(StorageError, match="P-256"):
        store.account_key(URL)


# --- certificates ----------------------------------------------------------------------------


def test_save_load_round_trip_and_modes(store: DirectoryStorage) -> None:
    chain, key = pair()
    old = os.umask(0o077)
    try:
        store.save_certificate(NAMES, chain, key)
    finally:
        os.umask(old)
    loaded = store.load_certificate(list(reversed(NAMES)))
    assert loaded is not None
    assert (loaded.chain_pem, loaded.key_pem) == (chain, key)
    assert loaded.version == store.certificate_version(NAMES)
    folder = Path(store.path) / "certificates" / cert_id(NAMES)
    assert mode(folder) == 0o700
    assert mode(folder / "fullchain.pem") == 0o644
    assert mode(folder / "bundle.pem") == 0o600
    assert (folder / "fullchain.pem").read_bytes() == chain
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_version_changes_on_save(store: DirectoryStorage) -> None:
    assert store.certificate_version(NAMES) is None
    store.save_certificate(NAMES, *pair())
    first = store.certificate_version(NAMES)
    assert first is not None and first == store.certificate_version(NAMES)
    store.save_certificate(NAMES, *pair())
    second = store.certificate_version(NAMES)
    assert second not in (None, first)
    loaded = store.load_certificate(NAMES)
    assert loaded is not None and loaded.version == second


def test_a_missing_bundle_is_no_certificate(store: DirectoryStorage) -> None:
    store.save_certificate(NAMES, *pair())
    (Path(store.path) / "certificates" / cert_id(NAMES) / "bundle.pem").unlink()
    assert store.certificate_version(NAMES) is None
    assert store.load_certificate(NAMES) is None


def test_key_chain_mismatch_is_detected(store: DirectoryStorage) -> None:
    chain, _ = pair()
    _, other_key = pair()
    store.save_certificate(NAMES, chain, other_key)
    with pytest.raises(StorageError, match="does not match"):
        store.load_certificate(NAMES)


def test_the_pair_is_one_file(store: DirectoryStorage) -> None:
    """Found in review: saved as two files (key, then chain), a crash between the two renames
    left a key that matched no chain, and every later load failed. One file, one rename:
    the convenience copy of the chain does not take part in loading."""
    old_chain, old_key = pair()
    store.save_certificate(NAMES, old_chain, old_key)
    folder = Path(store.path) / "certificates" / cert_id(NAMES)
    new_chain, _ = pair()
    (folder / "fullchain.pem").write_bytes(new_chain)  # as if the crash came after it
    loaded = store.load_certificate(NAMES)
    assert loaded is not None and (loaded.chain_pem, loaded.key_pem) == (old_chain, old_key)
    (folder / "fullchain.pem").unlink()
    assert store.load_certificate(NAMES) is not None


def test_corrupt_certificate_raises(store: DirectoryStorage) -> None:
    store.save_certificate(NAMES, b"not a pem", pair()[1])
    with pytest.raises(StorageError, match="corrupt"):
        store.load_certificate(NAMES)


# --- locks -----------------------------------------------------------------------------------


def _lock_path(store: DirectoryStorage) -> Path:
    return Path(store.path) / "locks" / (cert_id(NAMES) + ".lock")


def test_lock_is_exclusive_and_released(store: DirectoryStorage) -> None:
    lock = store.try_lock(NAMES, stale_after=60)
    assert lock is not None
    assert store.try_lock(list(reversed(NAMES)), stale_after=60) is None
    pid, _host, _when = _lock_path(store).read_text().split()
    assert int(pid) == os.getpid()
    lock.release()
    lock.release()  # idempotent
    assert not _lock_path(store).exists()
    again = store.try_lock(NAMES, stale_after=60)
    assert again is not None
    again.release()


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_lock_is_broken(store: DirectoryStorage) -> None:
    assert store.try_lock(NAMES, stale_after=60) is not None  # its holder "died"
    _age(_lock_path(store), 120)
    taken = store.try_lock(NAMES, stale_after=60)
    assert taken is not None
    assert [p.name for p in _lock_path(store).parent.iterdir()] == [_lock_path(store).name]
    taken.release()


def test_refresh_keeps_a_lock_fresh(store: DirectoryStorage) -> None:
    lock = store.try_lock(NAMES, stale_after=60)
    assert lock is not None
    _age(_lock_path(store), 120)
    lock.refresh()
    assert store.try_lock(NAMES, stale_after=60) is None
    lock.release()


def test_release_keeps_the_lock_another_process_took(store: DirectoryStorage) -> None:
    ours = store.try_lock(NAMES, stale_after=60)
    assert ours is not None
    _age(_lock_path(store), 120)  # we stalled: judged dead
    theirs = DirectoryStorage(store.path).try_lock(NAMES, stale_after=60)
    assert theirs is not None
    content = _lock_path(store).read_bytes()
    ours.release()
    assert _lock_path(store).read_bytes() == content
    with pytest.raises(StorageError, match="taken over"):
        ours.refresh()
    assert store.try_lock(NAMES, stale_after=60) is None
    theirs.release()
    assert not _lock_path(store).exists()


def test_breaking_does_not_remove_a_fresh_lock(
    store: DirectoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another breaker won between our judging the lock stale and our removing it.
    stale = store.try_lock(NAMES, stale_after=60)
    assert stale is not None
    _age(_lock_path(store), 120)
    real = directory._remove_if
    winner: list[object] = []

    def race(path: str, content: bytes) -> bool:
        assert real(path, content)  # the other breaker removes the stale lock...
        winner.append(DirectoryStorage(store.path).try_lock(NAMES, stale_after=60))
        return real(path, content)  # ...and our removal must leave its fresh one

    monkeypatch.setattr(directory, "_remove_if", race)
    assert store.try_lock(NAMES, stale_after=60) is None
    assert winner[0] is not None
    assert _lock_path(store).exists()


def _race(path: str, barrier: object, results: object) -> None:
    lock = DirectoryStorage(path).try_lock(NAMES, stale_after=60)
    results.put(lock is not None)  # type: ignore[attr-defined]
    barrier.wait()  # type: ignore[attr-defined]  # hold it until both have tried


@pytest.mark.parametrize("stale_first", [False, True])
def test_two_processes_racing_exactly_one_wins(store: DirectoryStorage, stale_first: bool) -> None:
    ctx = multiprocessing.get_context("fork")
    store.ensure()
    for _ in range(5):
        if stale_first:  # both see a dead holder's lock and break it at once
            assert store.try_lock(NAMES, stale_after=60) is not None
            _age(_lock_path(store), 120)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(store.path, barrier, results)) for _ in "ab"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        assert sorted(results.get(timeout=5) for _ in procs) == [False, True]
        _lock_path(store).unlink()


# --- challenges --------------------------------------------------------------------------------


def _ch(kind: str, name: str = "a.example.com", token: str = TOKEN) -> Challenge:
    return Challenge(kind, name, "https://acme.example/chall/1", token, f"{token}.thumb")


def test_http01_publish_read_withdraw(store: DirectoryStorage) -> None:
    ch = _ch("http-01")
    reader = DirectoryStorage(store.path)  # a worker's own instance
    store.publish_challenge(ch)
    assert reader.http01(TOKEN) == ch.key_authorization
    assert reader.tls_alpn01("a.example.com") is None
    path = Path(store.path) / "challenges" / "http-01" / TOKEN
    assert mode(path) == 0o644
    store.withdraw_challenge(ch)
    store.withdraw_challenge(ch)  # missing is fine
    assert reader.http01(TOKEN) is None


def test_tls_alpn01_publish_read_withdraw(store: DirectoryStorage) -> None:
    first, second = _ch("tls-alpn-01", token="first"), _ch("tls-alpn-01", token="second")
    store.publish_challenge(first)
    store.publish_challenge(second)  # one pending per name: the newer one answers
    assert store.tls_alpn01("a.example.com") == "second.thumb"
    assert store.http01("second") is None
    assert mode(Path(store.path) / "challenges" / "tls-alpn-01" / "a.example.com") == 0o644
    store.withdraw_challenge(second)
    assert store.tls_alpn01("a.example.com") is None


@pytest.mark.parametrize(
    "ch",
    [
        _ch("http-01", token="../x"),
        _ch("http-01", token="a/b"),
        _ch("http-01", token=""),
        _ch("http-01", token="."),
        _ch("http-01", token="a" * 300),
        _ch("tls-alpn-01", name="../x"),
        _ch("tls-alpn-01", name="a/b"),
        _ch("tls-alpn-01", name=""),
        _ch("tls-alpn-01", name="."),
        _ch("tls-alpn-01", name="A.example.com"),
        _ch("tls-alpn-01", name="*.example.com"),
        _ch("tls-alpn-01", name="a." * 200 + "com"),
        _ch("dns-01"),
    ],
    ids=repr,
)
def test_publish_refuses_bad_tokens_and_names(store: DirectoryStorage, ch: Challenge) -> None:
    with pytest.raises(ValueError):
        store.publish_challenge(ch)
    with pytest.raises(ValueError):
        store.withdraw_challenge(ch)
    assert not Path(store.path).exists()


BAD = ["../x", "a/b", "", ".", "..", "a" * 5000, "/etc/passwd", "a\x00b", "../../locks"]


@pytest.mark.parametrize("key", BAD)
def test_readers_refuse_traversal(tmp_path: Path, key: str) -> None:
    # Something readable where each traversal would land, were it not refused.
    store = DirectoryStorage(str(tmp_path / "acme"))
    store.ensure()
    for sub in ("challenges/http-01", "challenges/tls-alpn-01", "challenges", ""):
        (tmp_path / "acme" / sub / "x").write_text("secret")
    (tmp_path / "x").write_text("secret")
    assert store.http01(key) is None
    assert store.tls_alpn01(key) is None


@pytest.mark.parametrize(
    "content", [b"x" * 1025, b"\xff\xfe", None], ids=["over 1 KiB", "not ascii", "a directory"]
)
def test_unreadable_answer_is_a_miss(store: DirectoryStorage, content: bytes | None) -> None:
    store.ensure()
    for path in (
        Path(store.path) / "challenges" / "http-01" / TOKEN,
        Path(store.path) / "challenges" / "tls-alpn-01" / "a.example.com",
    ):
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
    assert store.http01(TOKEN) is None
    assert store.tls_alpn01("a.example.com") is None


def test_answer_of_exactly_1_kib_is_read(store: DirectoryStorage) -> None:
    store.ensure()
    (Path(store.path) / "challenges" / "http-01" / TOKEN).write_bytes(b"k" * 1024)
    assert store.http01(TOKEN) == "k" * 1024


def test_a_lock_whose_holder_died_on_this_host_is_broken_at_once(store: DirectoryStorage
                                                                  ) -> None:
    """Found in review: an ACME service SIGKILLed mid-order left its lock, which blocked
    the next order for ``stale_after`` although its holder was a dead process here."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = _lock_path(store)
    store.ensure()
    path.write_text(f"{dead.pid} {socket.gethostname()} {time.time():.9f}")
    assert store.try_lock(NAMES, stale_after=600) is not None
    # A live holder, or one of another host, is waited for.
    path.unlink()
    path.write_text(f"{os.getpid()} {socket.gethostname()} {time.time():.9f}")
    assert store.try_lock(NAMES, stale_after=600) is None
    path.write_text(f"{dead.pid} elsewhere.example {time.time():.9f}")
    assert store.try_lock(NAMES, stale_after=600) is None


def test_stored_names_are_read_from_each_certificate(store: DirectoryStorage) -> None:
    assert store.stored_names() == []
    store.save_certificate(["a.example.com"], *pair("a.example.com"))
    store.save_certificate(["b.example.com"], *pair("b.example.com"))
    junk = Path(store.path) / "certificates" / "junk"
    junk.mkdir()
    (junk / "fullchain.pem").write_text("not PEM")  # ignored, not an error
    assert sorted(store.stored_names()) == [("a.example.com",), ("b.example.com",)]
