"""A device: its state folder (LOFT_HOME), sign-up and login, and the running replica.

LOFT_HOME holds `device.json` (server, user, device, home space), `token` and `keys`
(both 0600: the device token; the user's private key, the device key that seals dirty
pages, and the space keys), and `store/`, the LMDB environment. Nothing in it is
plaintext file content.

`Session.open` wires the store, the backend stack, the chunk source, the replica and
its services (prefetchers, quiet-period journaler, flusher, reconciler) and runs them
in a nursery for as long as the session is open.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from backend.base import Backend, BackendError, BadCredentials, is_transient
from backend.http import HttpBackend
from backend.wrappers import stack
from cache.chunker import Chunker
from cache.chunks import ChunkSource, Connectivity
from cache.codec import ChunkCodec, DirtySealer
from cache.errors import ReplicaError
from cache.flusher import Flusher
from cache.keys import (
    SpaceKeys,
    UserKeyPair,
    WrongPassword,
    derive_account_keys,
    new_device_key,
    new_kdf_params,
    new_space_key,
    open_sealed,
    read_secret,
    seal_to,
    unwrap_private_key,
    wrap_private_key,
    write_secret,
)
from cache.reconciler import Reconciler
from cache.records import Kind, Node
from cache.replica import Replica
from cache.status import run_state_writer
from cache.store import Store
from loft import allocator
from loft.protocol import ROOT_NODE, LoginRequest, LoginResponse, SignupRequest

log = logging.getLogger(__name__)

DEFAULT_CACHE = 10 * 1024**3
MAP_CHECK_SECONDS = 0.25


async def run_map_keeper(store: Store, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keeps the pages of LMDB's map this process holds under a budget (MapPages)."""
    task_status.started()
    while True:
        store.mapped.keep_under()
        await trio.sleep(MAP_CHECK_SECONDS)


class NotLoggedIn(ReplicaError):
    pass


@dataclass(frozen=True)
class DeviceConfig:
    server: str
    user: str
    user_id: int
    device_id: str
    device_name: str
    home_space: str


@dataclass(frozen=True)
class Keyring:
    private_key: bytes
    device_key: bytes
    spaces: dict[str, bytes]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "private_key": self.private_key.hex(),
                "device_key": self.device_key.hex(),
                "spaces": {k: v.hex() for k, v in self.spaces.items()},
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Keyring:
        raw = json.loads(data)
        return cls(
            bytes.fromhex(raw["private_key"]),
            bytes.fromhex(raw["device_key"]),
            {k: bytes.fromhex(v) for k, v in raw["spaces"].items()},
        )


def load(home: Path) -> tuple[DeviceConfig, str, Keyring]:
    try:
        config = DeviceConfig(**json.loads((home / "device.json").read_text()))
        token = read_secret(home / "token").decode()
        keyring = Keyring.decode(read_secret(home / "keys"))
    except FileNotFoundError:
        raise NotLoggedIn(f"no device is logged in at {home}") from None
    return config, token, keyring


def _save(home: Path, config: DeviceConfig, token: str, keyring: Keyring) -> None:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(home / "token", token.encode())
    write_secret(home / "keys", keyring.encode())
    (home / "device.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    store = Store(home / "store")
    try:
        with store.write() as t:
            for space in keyring.spaces:
                if space not in t.spaces():
                    t.put_space(space, json.dumps({"id": space}).encode())
    finally:
        store.close()


def _seed_empty_home(home: Path, space: str) -> None:
    """A new account's home is an empty root at seq 0: mirror it now, so the device
    works offline from its first minute."""
    store = Store(home / "store")
    try:
        with store.write() as t:
            stamp = time.time_ns()
            t.put_node(Node(space, ROOT_NODE, Kind.DIR, mode=0o755, mtime_ns=stamp,
                            ctime_ns=stamp))
            t.set_meta_int(f"cursor:{space}", 0)
    finally:
        store.close()


def _config(server: str, resp: LoginResponse, device_name: str) -> DeviceConfig:
    return DeviceConfig(
        server=server,
        user=resp.user,
        user_id=resp.user_id,
        device_id=resp.device_id,
        device_name=device_name,
        home_space=resp.home_space,
    )


async def signup(
    home: Path, server: str, user: str, password: str, device_name: str
) -> DeviceConfig:
    """Creates the account (keys made here; the server gets only wrapped ones) and logs
    this device in."""
    kdf = new_kdf_params()
    keys = await trio.to_thread.run_sync(derive_account_keys, password, kdf)
    pair = UserKeyPair.generate()
    space_key = new_space_key()
    backend = HttpBackend(server)
    try:
        resp = await backend.signup(
            SignupRequest(
                name=user,
                auth_key=keys.auth_key,
                kdf=kdf,
                public_key=pair.public_bytes,
                wrapped_private_key=wrap_private_key(pair.private_bytes, keys.kek),
                home_space_key=seal_to(pair.public_bytes, space_key),
                device_name=device_name,
            )
        )
    finally:
        await backend.aclose()
    config = _config(server, resp, device_name)
    _save(
        home,
        config,
        resp.token,
        Keyring(pair.private_bytes, new_device_key(), {resp.home_space: space_key}),
    )
    _seed_empty_home(home, resp.home_space)
    return config


async def login(
    home: Path, server: str, user: str, password: str, device_name: str
) -> DeviceConfig:
    """Logs a new device in with the password alone. Raises WrongPassword."""
    backend = HttpBackend(server)
    try:
        kdf = await backend.prelogin(user)
        keys = await trio.to_thread.run_sync(derive_account_keys, password, kdf)
        try:
            resp = await backend.login(
                LoginRequest(name=user, auth_key=keys.auth_key, device_name=device_name)
            )
        except BadCredentials:
            raise WrongPassword("wrong user name or password") from None
        private = unwrap_private_key(resp.wrapped_private_key, keys.kek)
        backend.set_token(resp.token)
        spaces = {s.id: open_sealed(private, s.wrapped_key) for s in await backend.spaces()}
    finally:
        await backend.aclose()
    config = _config(server, resp, device_name)
    _save(home, config, resp.token, Keyring(private, new_device_key(), spaces))
    return config


class Session:
    def __init__(
        self,
        config: DeviceConfig,
        store: Store,
        backend: Backend,
        replica: Replica,
        flusher: Flusher,
        reconciler: Reconciler,
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.replica = replica
        self.flusher = flusher
        self.reconciler = reconciler

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        home: Path,
        *,
        cache_size: int = DEFAULT_CACHE,
        read_only: bool = False,
        backend: Backend | None = None,
        mountpoint: Path | None = None,
    ) -> AsyncIterator[Session]:
        config, token, keyring = load(home)
        allocator.configure()
        store = Store(home / "store")
        backend = backend or stack(config.server, token)
        codecs: dict[str, ChunkCodec] = {
            s: SpaceKeys.from_space_key(k).codec() for s, k in keyring.spaces.items()
        }
        net = Connectivity()
        chunks = ChunkSource(store, backend, codecs.__getitem__, cache_size, net)
        replica = Replica(
            store,
            chunks,
            DirtySealer(keyring.device_key),
            config.home_space,
            config.device_name,
            net,
            read_only=read_only,
        )
        flusher = Flusher(replica, backend, codecs.__getitem__, Chunker())
        reconciler = Reconciler(replica, backend)
        session = cls(config, store, backend, replica, flusher, reconciler)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(allocator.run_trimmer)
                await nursery.start(run_map_keeper, store)
                await nursery.start(chunks.run_prefetchers)
                await nursery.start(replica.run_quiet_journaler)
                if not read_only:
                    await nursery.start(flusher.run)
                await nursery.start(reconciler.run)
                await nursery.start(
                    run_state_writer, home, replica,
                    {"cache_cap": cache_size,
                     "mountpoint": str(mountpoint) if mountpoint else None},
                )
                try:
                    yield session
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await backend.aclose()
            store.close()

    async def import_file(self, src: Path, parent: str, name: str) -> str:
        """Uploads a local file as a new file `name` in `parent` (home space); returns
        its node id. The file is read once, in chunks, never held whole."""
        home = self.replica.home
        manifest = await self.flusher.upload_file(home, src)
        return self.replica.create_uploaded(home, parent, name, manifest).id

    async def export_file(self, node_id: str, dst: Path, step: int = 8 * 1024 * 1024) -> int:
        """Writes a file's content to a local path; returns the bytes written."""
        home = self.replica.home
        size = self.replica.node(home, node_id).size
        written = 0
        async with await trio.open_file(dst, "wb") as out:
            while written < size:
                data = await self.replica.read(home, node_id, written, step)
                if not data:
                    break
                await out.write(data)
                written += len(data)
        return written

    async def sync(self) -> None:
        """Returns once every local change is on the server and the mirror has caught up
        with it (as of when this was called)."""
        self.replica.journal_all()
        while True:
            if await self._drained():
                cursors = self.reconciler.cursors()
                answer = await self.backend.changes(cursors, wait=0, limit=1)
                if all(not page.changes for page in answer.spaces.values()) and self.replica.idle():
                    return
            await trio.sleep(0.02)

    async def sync_to_heads(self) -> None:
        """Returns once every local change is on the server and the mirror has every
        change the server had when this was called (its heads then), however busy the
        space is since. Waits through server outages (the caller bounds the wait)."""
        while True:
            try:
                heads = {s.id: s.head for s in await self.backend.spaces()}
                break
            except BackendError as exc:
                if not is_transient(exc):
                    raise
                await trio.sleep(0.5)
        self.replica.journal_all()
        while True:
            if await self._drained() and self.replica.idle():
                cursors = self.reconciler.cursors()
                if all(cursors.get(s, -1) >= h for s, h in heads.items()):
                    return
            await trio.sleep(0.02)

    async def _drained(self) -> bool:
        """Waits until the replica's services are idle; True if no commit is in flight."""
        await self.replica.wait_idle()
        with self.store.read() as t:
            return t.meta("inflight") is None
