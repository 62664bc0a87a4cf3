"""One conformance suite for every backend stack, against a real `loft serve` process.

Each test runs once per variant of `connect`: the bare `HttpBackend` and the standard
`stack()` (retries over concurrency limits over HTTP). Accounts are made through the
backend under test, with random bytes for keys: the server treats them as opaque.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from backend import (
    Backend,
    BadCredentials,
    BadRequest,
    ChunkMissing,
    CommitConflict,
    Forbidden,
    HttpBackend,
    NotFound,
    RetryingBackend,
    TooLarge,
    Unauthorized,
    Unreachable,
    UserExists,
    is_transient,
    layer,
    stack,
)
from loft.protocol import (
    MAX_BATCH_BODY_BYTES,
    MAX_BLOB_BYTES,
    MAX_IDS_PER_REQUEST,
    ROOT_NODE,
    CommitRequest,
    Content,
    CreateOp,
    CreateSpaceRequest,
    KdfParams,
    LoginRequest,
    LoginResponse,
    MemberAddRequest,
    MkdirOp,
    OpCode,
    SignupRequest,
    UnlinkOp,
    UpdateOp,
)
from tests.serverproc import ServerProcess

Connect = Callable[..., Backend]


def _new_backend(
    variant: str, url: str, token: str | None, timeout: float, attempts: int
) -> Backend:
    if variant == "http":
        return HttpBackend(url, token, timeout=timeout)
    return stack(url, token, timeout=timeout, attempts=attempts)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: every test makes accounts of its own. Its log must
    stay free of errors."""
    proc = ServerProcess(tmp_path_factory.mktemp("backend") / "server").start()
    try:
        yield proc
    finally:
        proc.stop()
    problems = proc.log_problems()
    if problems:
        pytest.fail("server logged errors:\n" + "\n".join(problems))


@pytest.fixture(params=["http", "stack"])
async def connect(
    request: pytest.FixtureRequest, shared_server: ServerProcess
) -> AsyncIterator[Connect]:
    """Makes backends of the variant under test (to the shared server unless given a
    url); closes them all afterwards."""
    opened: list[Backend] = []

    def connect(
        token: str | None = None,
        *,
        url: str | None = None,
        timeout: float = 30.0,
        attempts: int = 5,
    ) -> Backend:
        backend = _new_backend(request.param, url or shared_server.url, token, timeout, attempts)
        assert isinstance(backend, Backend)  # every method of the contract is there
        opened.append(backend)
        return backend

    try:
        yield connect
    finally:
        for backend in opened:
            await backend.aclose()


@dataclass
class Account:
    name: str
    auth_key: bytes
    kdf: KdfParams
    public_key: bytes
    login: LoginResponse
    backend: Backend

    @property
    def home(self) -> str:
        return self.login.home_space


async def new_account(connect: Callable[..., Backend], name: str | None = None) -> Account:
    name = name or f"user{uuid.uuid4().hex[:10]}"
    auth_key, public_key = os.urandom(32), os.urandom(32)
    kdf = KdfParams(salt=os.urandom(16), n=1024, r=8, p=1)
    login = await connect().signup(
        SignupRequest(
            name=name,
            auth_key=auth_key,
            kdf=kdf,
            public_key=public_key,
            wrapped_private_key=os.urandom(60),
            home_space_key=os.urandom(80),
            device_name="laptop",
        )
    )
    return Account(name, auth_key, kdf, public_key, login, connect(login.token))


async def second_device(connect: Connect, account: Account, device: str = "phone") -> Backend:
    login = await connect().login(
        LoginRequest(name=account.name, auth_key=account.auth_key, device_name=device)
    )
    return connect(login.token)


def chunk(data: bytes) -> tuple[str, bytes]:
    """(id, blob) for test content: any 64-hex id unique to the data will do."""
    return hashlib.sha256(data).hexdigest(), data


def new_id() -> str:
    return str(uuid.uuid4())


def commit_of(*ops: Any) -> CommitRequest:
    return CommitRequest(commit_id=new_id(), ops=list(ops))


def http_of(backend: Backend) -> HttpBackend:
    return layer(backend, HttpBackend)


# ------------------------------------------------------------------------- accounts


async def test_backend_accounts_signup_prelogin_login(connect: Connect):
    me = await new_account(connect)
    assert me.login.user == me.name
    assert me.login.public_key == me.public_key

    assert await connect().prelogin(me.name) == me.kdf
    decoy = await connect().prelogin(f"nobody{uuid.uuid4().hex[:8]}")
    assert decoy.salt != me.kdf.salt

    phone = await second_device(connect, me)
    devices = await phone.devices()
    assert [d.name for d in devices] == ["laptop", "phone"]
    assert [d.current for d in devices] == [False, True]
    assert await phone.user_key(me.name) == me.public_key

    with pytest.raises(BadCredentials):
        await connect().login(
            LoginRequest(name=me.name, auth_key=os.urandom(32), device_name="thief")
        )
    with pytest.raises(UserExists):
        await new_account(connect, me.name)
    with pytest.raises(NotFound):
        await phone.user_key(f"nobody{uuid.uuid4().hex[:8]}")
    with pytest.raises(Unauthorized):
        await connect().spaces()
    with pytest.raises(BadRequest):
        await connect().prelogin("not a valid name")


async def test_backend_revoke_and_logout_make_tokens_unauthorized(connect: Connect):
    me = await new_account(connect)
    phone = await second_device(connect, me)
    phone_id = next(d.id for d in await phone.devices() if d.current)

    await me.backend.revoke(phone_id)
    await me.backend.revoke(phone_id)  # revoking twice is not an error
    with pytest.raises(Unauthorized) as caught:
        await phone.spaces()
    assert caught.value.status == 401 and not is_transient(caught.value)
    revoked = [d for d in await me.backend.devices() if d.id == phone_id]
    assert revoked[0].revoked is not None

    with pytest.raises(NotFound):
        await me.backend.revoke(new_id())
    await me.backend.logout()
    with pytest.raises(Unauthorized):
        await me.backend.devices()


# ------------------------------------------------------------------------- spaces


async def test_backend_spaces_members_and_roles(connect: Connect):
    owner = await new_account(connect)
    guest = await new_account(connect)
    [home] = await owner.backend.spaces()
    assert (home.id, home.role, home.owner) == (owner.home, "owner", owner.name)
    assert (await owner.backend.space(owner.home)).head == 0

    shared = await owner.backend.create_space(
        CreateSpaceRequest(name="photos", wrapped_key=os.urandom(48))
    )
    member = await owner.backend.add_member(
        shared.id, MemberAddRequest(user=guest.name, role="viewer", wrapped_key=os.urandom(48))
    )
    assert (member.user, member.role) == (guest.name, "viewer")
    assert {(m.user, m.role) for m in await guest.backend.members(shared.id)} == {
        (owner.name, "owner"),
        (guest.name, "viewer"),
    }
    assert shared.id in {s.id for s in await guest.backend.spaces()}
    with pytest.raises(Forbidden):
        await guest.backend.put_chunk(shared.id, *chunk(b"viewers cannot write"))

    await owner.backend.remove_member(shared.id, guest.name)
    with pytest.raises(NotFound):
        await guest.backend.space(shared.id)


async def test_backend_strangers_space_is_not_found(connect: Connect):
    me = await new_account(connect)
    stranger = await new_account(connect)
    chunk_id, blob = chunk(b"private")
    await me.backend.put_chunk(me.home, chunk_id, blob)
    them = stranger.backend
    mkdir = commit_of(MkdirOp(node=new_id(), parent=ROOT_NODE, name="x"))
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: them.space(me.home),
        lambda: them.get_chunk(me.home, chunk_id),
        lambda: them.get_chunks(me.home, [chunk_id]),
        lambda: them.tree(me.home),
        lambda: them.trash(me.home),
        lambda: them.commit(me.home, mkdir),
        lambda: them.changes({me.home: 0}),
    ]
    for call in calls:
        with pytest.raises(NotFound) as caught:
            await call()
        assert not isinstance(caught.value, ChunkMissing)


# ------------------------------------------------------------------------- chunks


async def test_backend_chunk_put_get_missing_and_counters(connect: Connect):
    me = await new_account(connect)
    http = http_of(me.backend)
    big_id, big = chunk(os.urandom(1 << 20))
    small_id, small = chunk(b"small")
    absent = "ab" * 32

    assert await me.backend.missing(me.home, [big_id, absent, big_id, small_id]) == [
        big_id,
        absent,
        small_id,
    ]
    sent = http.bytes_sent
    await me.backend.put_chunk(me.home, big_id, big)
    assert http.bytes_sent - sent == len(big)
    await me.backend.put_chunk(me.home, big_id, big)  # content-addressed: again is fine
    await me.backend.put_chunk(me.home, small_id, small)
    assert await me.backend.missing(me.home, [big_id, absent, small_id]) == [absent]

    received = http.bytes_received
    assert await me.backend.get_chunk(me.home, big_id) == big
    assert http.bytes_received - received == len(big)
    # a read-ahead hint names chunks to come; held or not, the answer is the one asked
    assert await me.backend.get_chunk(me.home, small_id, [big_id, absent]) == small
    with pytest.raises(ChunkMissing):
        await me.backend.get_chunk(me.home, absent)
    with pytest.raises(BadRequest):
        await me.backend.get_chunk(me.home, "not-hex")
    with pytest.raises(TooLarge):
        await me.backend.put_chunk(me.home, absent, bytes(MAX_BLOB_BYTES + 1))
    assert http.requests["put_chunk"] == 3


async def test_backend_batches_put_get_with_missing_frames(connect: Connect):
    me = await new_account(connect)
    http = http_of(me.backend)
    items = [chunk(os.urandom(n)) for n in (1, 100, 70_000, 300_000, 5)]
    await me.backend.put_chunks(me.home, [*items, items[0]])
    assert http.requests["put_chunks"] == 1
    assert http.bytes_sent == sum(len(b) for _, b in items)

    absent = "cd" * 32
    got = await me.backend.get_chunks(me.home, [absent, *(c for c, _ in items), absent])
    assert got == {absent: None, **dict(items)}
    assert http.bytes_received == sum(len(b) for _, b in items)
    assert await me.backend.get_chunks(me.home, []) == {}

    many = [f"{i:064x}" for i in range(MAX_IDS_PER_REQUEST + 50)]
    assert await me.backend.missing(me.home, many) == many
    assert http.requests["missing"] == 2


async def test_backend_batches_split_at_the_body_limit(connect: Connect):
    me = await new_account(connect)
    http = http_of(me.backend)
    blob = os.urandom(4 << 20)
    # Distinct blobs of 4 MiB that share one buffer: more than one batch body holds.
    count = MAX_BATCH_BODY_BYTES // len(blob) + 1
    items = [(f"{i:064x}", blob[i:] + blob[:i]) for i in range(count)]
    await me.backend.put_chunks(me.home, items)
    assert http.requests["put_chunks"] == 2
    got = await me.backend.get_chunks(me.home, [c for c, _ in items])
    assert got == dict(items)
    # The server refuses answers over the limit; the backend asks again in halves.
    assert http.requests["get_chunks"] == 3


# ------------------------------------------------------------------------- commits


async def test_backend_commit_returns_seqs_and_replays(connect: Connect):
    me = await new_account(connect)
    chunk_id, blob = chunk(b"hello")
    await me.backend.put_chunk(me.home, chunk_id, blob)
    docs = MkdirOp(node=new_id(), parent=ROOT_NODE, name="docs")
    hello = CreateOp(
        node=new_id(),
        parent=docs.node,
        name="hello.txt",
        content=Content(size=5, chunks=[(chunk_id, 5)]),
    )
    req = commit_of(docs, hello)
    answer = await me.backend.commit(me.home, req)
    assert (answer.first_seq, answer.last_seq, answer.seqs, answer.replayed) == (
        1,
        2,
        [1, 2],
        False,
    )
    again = await me.backend.commit(me.home, req)
    assert (again.seqs, again.replayed) == ([1, 2], True)
    assert (await me.backend.space(me.home)).head == 2


async def test_backend_commit_conflict_reports_each_op(connect: Connect):
    me = await new_account(connect)
    node = new_id()
    created = await me.backend.commit(
        me.home, commit_of(CreateOp(node=node, parent=ROOT_NODE, name="f"))
    )
    base = created.seqs[0]
    assert base is not None
    await me.backend.commit(
        me.home, commit_of(UpdateOp(node=node, base=base, content=Content(size=0)))
    )

    stale = UpdateOp(node=node, base=base, content=Content(size=0))
    fine = MkdirOp(node=new_id(), parent=ROOT_NODE, name="d")
    with pytest.raises(CommitConflict) as caught:
        await me.backend.commit(me.home, commit_of(fine, stale))
    results = caught.value.results
    assert [r.code for r in results] == [OpCode.OK, OpCode.STALE_BASE]
    assert results[1].current == base + 1
    assert [r.index for r in caught.value.refused] == [1]
    assert caught.value.status == 409 and not is_transient(caught.value)

    unknown = ("ef" * 32, 10)
    with pytest.raises(CommitConflict) as caught:
        await me.backend.commit(
            me.home,
            commit_of(
                CreateOp(
                    node=new_id(),
                    parent=ROOT_NODE,
                    name="g",
                    content=Content(size=10, chunks=[unknown]),
                )
            ),
        )
    assert caught.value.results[0].code == OpCode.MISSING_CHUNKS


# ------------------------------------------------------------------------- sync


async def test_backend_long_poll_wakes_on_another_backends_commit(connect: Connect):
    me = await new_account(connect)
    # A timeout shorter than the wait: the poll must still be read to its end.
    laptop = connect(me.login.token, timeout=1.0)
    phone = await second_device(connect, me)
    answers: list[Any] = []

    async def poll() -> None:
        answers.append(await laptop.changes({me.home: 0}, wait=20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.3)  # the poll is parked
        committed = trio.current_time()
        await phone.commit(me.home, commit_of(MkdirOp(node=new_id(), parent=ROOT_NODE, name="d")))
    assert trio.current_time() - committed < 2
    page = answers[0].spaces[me.home]
    assert [c.name for c in page.changes] == ["d"]
    assert (page.cursor, page.more) == (1, False)

    started = time.monotonic()
    quiet = await laptop.changes({me.home: 1}, wait=1.5)
    assert 1.5 <= time.monotonic() - started < 5
    assert quiet.spaces[me.home].changes == []

    now = await phone.changes({})
    assert now.unknown_spaces == [me.home]


async def test_backend_tree_paginates(connect: Connect):
    me = await new_account(connect)
    first = await me.backend.commit(
        me.home,
        commit_of(*(MkdirOp(node=new_id(), parent=ROOT_NODE, name=f"d{i:02}") for i in range(25))),
    )
    await me.backend.commit(
        me.home, commit_of(MkdirOp(node=new_id(), parent=ROOT_NODE, name="late"))
    )

    names: list[str] = []
    after, pages = None, 0
    while True:
        page = await me.backend.tree(me.home, after=after, limit=10)
        assert page.seq == 26
        names += [e.name for n in page.nodes for e in n.entries]
        pages += 1
        after = page.next
        if after is None:
            break
    assert pages == 3
    assert sorted(names) == sorted([*(f"d{i:02}" for i in range(25)), "late"])

    old = await me.backend.tree(me.home, at=first.last_seq)
    assert old.seq == 25 and len(old.nodes) == 26  # the root and 25 folders
    with pytest.raises(BadRequest):
        await me.backend.tree(me.home, limit=0)


async def test_backend_versions_and_trash(connect: Connect):
    me = await new_account(connect)
    one, two = chunk(b"one"), chunk(b"two!")
    await me.backend.put_chunks(me.home, [one, two])
    node = new_id()
    created = await me.backend.commit(
        me.home,
        commit_of(
            CreateOp(
                node=node,
                parent=ROOT_NODE,
                name="f.txt",
                content=Content(size=3, chunks=[(one[0], 3)]),
            )
        ),
    )
    v1 = created.seqs[0]
    assert v1 is not None
    updated = await me.backend.commit(
        me.home,
        commit_of(UpdateOp(node=node, base=v1, content=Content(size=4, chunks=[(two[0], 4)]))),
    )
    v2 = updated.seqs[0]
    assert v2 is not None

    history = await me.backend.versions(me.home, node)
    assert [(v.version, v.size, v.current) for v in history.versions] == [
        (v2, 4, True),
        (v1, 3, False),
    ]
    old = await me.backend.version(me.home, node, v1)
    assert old.chunks == [(one[0], 3)]
    with pytest.raises(NotFound):
        await me.backend.version(me.home, node, v2 + 100)
    with pytest.raises(NotFound):
        await me.backend.versions(me.home, new_id())

    assert (await me.backend.trash(me.home)).items == []
    await me.backend.commit(
        me.home, commit_of(UnlinkOp(node=node, parent=ROOT_NODE, name="f.txt", base=v2))
    )
    [item] = (await me.backend.trash(me.home)).items
    assert (item.node, item.name, item.version, item.size) == (node, "f.txt", v2, 4)
    assert (await me.backend.versions(me.home, node)).deleted


# ------------------------------------------------------------------------- failures


async def test_backend_stopped_server_is_unreachable(connect: Connect, server: ServerProcess):
    login = await connect(url=server.url).signup(
        SignupRequest(
            name=f"user{uuid.uuid4().hex[:10]}",
            auth_key=os.urandom(32),
            kdf=KdfParams(salt=os.urandom(16), n=1024, r=8, p=1),
            public_key=os.urandom(32),
            wrapped_private_key=b"",
            home_space_key=b"",
            device_name="laptop",
        )
    )
    warm = connect(login.token, url=server.url, attempts=2)
    await warm.spaces()  # now it holds a pooled connection
    server.stop()
    for backend in (warm, connect(login.token, url=server.url, attempts=2)):
        with pytest.raises(Unreachable) as caught:
            await backend.spaces()
        assert is_transient(caught.value)
    with pytest.raises(Unreachable):
        await connect(url=server.url, attempts=2).prelogin(login.user)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_backend_retrying_recovers_when_the_server_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # A fixed port given after ServerProcess's own `--port` (click keeps the last value),
    # so the restarted server answers at the same address.
    proc = ServerProcess(tmp_path / "restart", "--port", str(_free_port())).start()
    opened: list[Backend] = []

    def connect(token: str | None = None) -> Backend:
        opened.append(HttpBackend(proc.url, token))
        return opened[-1]

    try:
        me = await new_account(connect)
        backend = stack(proc.url, me.login.token, attempts=8)
        opened.append(backend)
        chunk_id, blob = chunk(b"survives a restart")
        await backend.put_chunk(me.home, chunk_id, blob)

        proc.stop()

        async def come_back() -> None:
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(proc.start)

        caplog.set_level(logging.WARNING, logger="backend")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(come_back)
            assert await backend.get_chunk(me.home, chunk_id) == blob
        answer = await backend.commit(
            me.home, commit_of(MkdirOp(node=new_id(), parent=ROOT_NODE, name="after"))
        )
        assert answer.seqs == [1]

        retrying = layer(backend, RetryingBackend)
        assert retrying.retries.get("get_chunk", 0) >= 1
        levels = {r.levelno for r in caplog.records if r.name.startswith("backend")}
        assert levels == {logging.WARNING}
    finally:
        for b in opened:
            await b.aclose()
        proc.stop()
    assert proc.log_problems() == []


async def test_backend_retrying_gives_up_and_does_not_retry_login(tmp_path: Path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens here
    backend = stack(url, "token", attempts=2)
    try:
        started = time.monotonic()
        with pytest.raises(Unreachable):
            await backend.spaces()
        assert layer(backend, RetryingBackend).retries == {"spaces": 1}
        with pytest.raises(Unreachable):
            await backend.login(LoginRequest(name="someone", auth_key=bytes(32), device_name="d"))
        with pytest.raises(Unreachable):
            await backend.changes({}, wait=5)
        assert layer(backend, RetryingBackend).retries == {"spaces": 1}
        assert time.monotonic() - started < 2
        assert layer(backend, HttpBackend).requests == {"spaces": 2, "login": 1, "changes": 1}
    finally:
        await backend.aclose()
