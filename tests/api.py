"""A thin synchronous HTTP helper for driving a real server in tests.

It speaks the wire protocol directly (httpx + the pydantic models' JSON shapes) so that
server tests do not depend on the client replica. Keys are random bytes: the server
must treat them as opaque blobs, which is what these tests check.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

import blake3
import httpx

from loft.protocol import DIGEST_HEADER, FRAME_HEAD, ROOT_NODE


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class User:
    name: str
    token: str
    user_id: int
    device_id: str
    home: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def auth_key_for(name: str, password: str = "secret") -> bytes:
    return hashlib.sha256(f"{name}:{password}".encode()).digest()


def fake_chunk(data: bytes) -> tuple[str, bytes]:
    """(id, blob) for test content: the id is any 64-hex value unique to the data."""
    return hashlib.sha256(data).hexdigest(), data


class Api:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=90)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    # accounts

    def signup(
        self, name: str | None = None, password: str = "secret", device: str = "laptop"
    ) -> User:
        name = name or f"user{uuid.uuid4().hex[:10]}"
        r = self.http.post(
            "/v1/signup",
            json={
                "name": name,
                "auth_key": b64(auth_key_for(name, password)),
                "kdf": {"alg": "scrypt", "salt": b64(os.urandom(16)), "n": 1024, "r": 8, "p": 1},
                "public_key": b64(os.urandom(32)),
                "wrapped_private_key": b64(os.urandom(60)),
                "home_space_key": b64(os.urandom(80)),
                "device_name": device,
            },
        )
        assert r.status_code == 201, r.text
        return self._user(r.json())

    def login(self, name: str, password: str = "secret", device: str = "phone") -> User:
        r = self.http.post(
            "/v1/login",
            json={
                "name": name,
                "auth_key": b64(auth_key_for(name, password)),
                "device_name": device,
            },
        )
        assert r.status_code == 200, r.text
        return self._user(r.json())

    @staticmethod
    def _user(body: dict[str, Any]) -> User:
        return User(
            name=body["user"],
            token=body["token"],
            user_id=body["user_id"],
            device_id=body["device_id"],
            home=body["home_space"],
        )

    # generic

    def get(self, user: User | None, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, headers=user.headers if user else {}, **kw)

    def post(self, user: User | None, path: str, **kw: Any) -> httpx.Response:
        return self.http.post(path, headers=user.headers if user else {}, **kw)

    # chunks

    def put_chunk(self, user: User, space: str, data: bytes) -> tuple[str, int]:
        chunk_id, blob = fake_chunk(data)
        r = self.http.put(
            f"/v1/spaces/{space}/chunks/{chunk_id}",
            content=blob,
            headers={**user.headers, DIGEST_HEADER: blake3.blake3(blob).hexdigest()},
        )
        assert r.status_code == 201, r.text
        return chunk_id, len(data)

    def put_batch(self, user: User, space: str, datas: list[bytes]) -> list[tuple[str, int]]:
        body = bytearray()
        refs = []
        for data in datas:
            chunk_id, blob = fake_chunk(data)
            body += FRAME_HEAD.pack(bytes.fromhex(chunk_id), len(blob))
            body += blake3.blake3(blob).digest() + blob
            refs.append((chunk_id, len(data)))
        r = self.http.post(
            f"/v1/spaces/{space}/chunks/batch", content=bytes(body), headers=user.headers
        )
        assert r.status_code == 201, r.text
        return refs

    def get_batch(self, user: User, space: str, ids: list[str]) -> dict[str, bytes | None]:
        r = self.post(user, f"/v1/spaces/{space}/chunks/fetch", json={"ids": ids})
        assert r.status_code == 200, r.text
        out: dict[str, bytes | None] = {}
        view, pos = r.content, 0
        while pos < len(view):
            raw, length = FRAME_HEAD.unpack_from(view, pos)
            pos += FRAME_HEAD.size
            if length == 0xFFFFFFFF:
                out[raw.hex()] = None
                continue
            out[raw.hex()] = view[pos : pos + length]
            pos += length
        return out

    # commits and sync

    def commit(
        self, user: User, space: str, ops: list[dict[str, Any]], commit_id: str | None = None
    ) -> httpx.Response:
        return self.post(
            user,
            f"/v1/spaces/{space}/commit",
            json={"commit_id": commit_id or new_id(), "ops": ops},
        )

    def commit_ok(self, user: User, space: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.commit(user, space, ops)
        assert r.status_code == 200, r.text
        return r.json()

    def tree(self, user: User, space: str, at: int | None = None) -> dict[str, dict]:
        """{path: node state} of the whole tree, following pagination."""
        nodes: list[dict] = []
        after = None
        while True:
            params: dict[str, Any] = {}
            if at is not None:
                params["at"] = at
            if after:
                params["after"] = after
            r = self.get(user, f"/v1/spaces/{space}/tree", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            nodes += body["nodes"]
            after = body["next"]
            if not after:
                break
        by_id = {n["state"]["node"]: n for n in nodes}
        paths: dict[str, dict] = {}

        def path_of(node_id: str, parent: str, name: str) -> str:
            prefix = ""
            while parent != ROOT_NODE:
                p = by_id[parent]["entries"][0]
                prefix = f"{p['name']}/{prefix}"
                parent = p["parent"]
            return prefix + name

        for n in nodes:
            for e in n["entries"]:
                paths[path_of(n["state"]["node"], e["parent"], e["name"])] = n["state"]
        return paths

    def changes(
        self, user: User, cursors: dict[str, int], wait: float = 0, limit: int = 1000
    ) -> dict[str, Any]:
        r = self.post(user, "/v1/changes", json={"cursors": cursors, "wait": wait, "limit": limit})
        assert r.status_code == 200, r.text
        return r.json()


# op builders: each returns the op as JSON


def mkdir(parent: str, name: str, node: str | None = None) -> dict[str, Any]:
    return {"op": "mkdir", "node": node or new_id(), "parent": parent, "name": name}


def create(
    parent: str,
    name: str,
    chunks: list[tuple[str, int]] = (),
    node: str | None = None,
    mode: int = 0o644,
) -> dict[str, Any]:
    return {
        "op": "create",
        "node": node or new_id(),
        "parent": parent,
        "name": name,
        "attrs": {"mode": mode},
        "content": {"size": sum(n for _, n in chunks), "chunks": [list(c) for c in chunks]},
    }


def update(node: str, base: int, chunks: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "op": "update",
        "node": node,
        "base": base,
        "content": {"size": sum(n for _, n in chunks), "chunks": [list(c) for c in chunks]},
    }
