"""The authorization matrix, walked from the server's own OpenAPI document.

Every operation in `GET /v1/openapi.json` is called as: nobody (no or a bad token), a
stranger, a viewer, an editor and the owner of the space. `security` says an operation
needs a device token (401 without one); `x-loft-role` says the least role it needs in the
`{space}` of its path: non-members get 404 (a space's existence is not revealed), members
below the role 403. Each operation needs a recipe below, a plausible request for it, so a
new endpoint fails `test_openapi_every_operation_has_a_recipe` until it joins the matrix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import httpx
import pytest

from loft.protocol import DIGEST_HEADER, FRAME_HEAD, ROOT_NODE
from tests.api import Api, User, auth_key_for, b64, fake_chunk, mkdir, new_id

ROLE_RANK = {"viewer": 0, "editor": 1, "owner": 2}


@dataclass
class Call:
    """One plausible request for an operation, as one caller would send it."""

    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Sends with this user's token instead of the caller's (a throwaway device).
    sender: User | None = None
    #: Sets up what the call needs; run only for callers with a valid token.
    before: Callable[[], None] | None = None
    #: Undoes what a successful call changed, so later calls see the same world.
    undo: Callable[[], None] | None = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    secured: bool
    role: str | None
    success: int

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class World:
    api: Api
    operations: list[Operation]
    owner: User
    editor: User
    viewer: User
    stranger: User
    #: A user the owner adds and removes again.
    spare: User
    revoked_token: str
    #: A chunk stored in the owner's space.
    chunk: str

    @property
    def space(self) -> str:
        return self.owner.home

    def role_of(self, user: User) -> str | None:
        return {self.owner.name: "owner", self.editor.name: "editor",
                self.viewer.name: "viewer"}.get(user.name)

    def share(self, user: User, role: str) -> None:
        r = self.api.post(self.owner, f"/v1/spaces/{self.space}/members", json={
            "user": user.name, "role": role, "wrapped_key": b64(os.urandom(48))})
        assert r.status_code == 200, r.text

    def send(self, op: Operation, call: Call, authorization: str | None,
             space: str | None = None) -> httpx.Response:
        params = {"space": space or self.space, "chunk": self.chunk, "node": ROOT_NODE,
                  "version": "0", "device": str(uuid.uuid4()), "user": self.owner.name,
                  **call.params}
        headers = dict(call.headers)
        if authorization is not None:
            headers["authorization"] = authorization
        return self.api.http.request(op.method, op.path.format(**params), json=call.json,
                                     content=call.content, headers=headers)

    def call_as(self, op: Operation, caller: User, space: str | None = None) -> httpx.Response:
        """Calls `op` with `caller`'s token; undoes its effect when it succeeded."""
        call = recipe(self, op, caller)
        if call.before is not None:
            call.before()
        sender = call.sender or caller
        r = self.send(op, call, f"Bearer {sender.token}", space)
        if r.is_success and call.undo is not None:
            call.undo()
        return r


# ---------------------------------------------------------------------------- recipes


def _signup(w: World, caller: User) -> Call:
    name = f"authz{uuid.uuid4().hex[:10]}"
    return Call(json={
        "name": name, "auth_key": b64(auth_key_for(name)),
        "kdf": {"alg": "scrypt", "salt": b64(os.urandom(16)), "n": 1024, "r": 8, "p": 1},
        "public_key": b64(os.urandom(32)), "wrapped_private_key": b64(os.urandom(60)),
        "home_space_key": b64(os.urandom(80)), "device_name": "authz"})


def _login(w: World, caller: User) -> Call:
    return Call(json={"name": w.owner.name, "auth_key": b64(auth_key_for(w.owner.name)),
                      "device_name": "authz"})


def _remove_member(w: World, caller: User) -> Call:
    # Members may remove themselves, and the owner anyone but themselves.
    if caller is w.owner:
        return Call(params={"user": w.spare.name},
                    before=lambda: w.share(w.spare, "viewer"))
    role = w.role_of(caller)
    undo = (lambda: w.share(caller, role)) if role else None
    return Call(params={"user": caller.name}, undo=undo)


def _logout(w: World, caller: User) -> Call:
    call = Call()

    def before() -> None:
        call.sender = w.api.login(caller.name, device="throwaway")

    call.before = before
    return call


def _revoke_device(w: World, caller: User) -> Call:
    call = Call()

    def before() -> None:
        call.params["device"] = w.api.login(caller.name, device="throwaway").device_id

    call.before = before
    return call


def _put_chunk(w: World, caller: User) -> Call:
    chunk_id, blob = fake_chunk(os.urandom(64))
    return Call(params={"chunk": chunk_id}, content=blob,
                headers={DIGEST_HEADER: blake3.blake3(blob).hexdigest()})


def _put_batch(w: World, caller: User) -> Call:
    chunk_id, blob = fake_chunk(os.urandom(64))
    frame = FRAME_HEAD.pack(bytes.fromhex(chunk_id), len(blob)) + blake3.blake3(blob).digest()
    return Call(content=frame + blob)


def _commit(w: World, caller: User) -> Call:
    return Call(json={"commit_id": new_id(),
                      "ops": [mkdir(ROOT_NODE, f"authz-{uuid.uuid4().hex[:8]}")]})


def _nothing(w: World, caller: User) -> Call:
    return Call()


def _space_request(w: World, caller: User) -> Call:
    return Call(json={"name": "shared", "wrapped_key": b64(os.urandom(48))})


def _member_request(w: World, caller: User) -> Call:
    return Call(json={"user": w.viewer.name, "role": "viewer",
                      "wrapped_key": b64(os.urandom(48))})


#: For each operation: who may call it ("public", "device": any valid token, or the
#: least role in `{space}`), pinned here so that loosening it fails this test, and how
#: to build a plausible request for it.
RECIPES: dict[str, tuple[str, Callable[[World, User], Call]]] = {
    "GET /v1/openapi.json": ("public", _nothing),
    "GET /v1/health": ("public", _nothing),
    "POST /v1/signup": ("public", _signup),
    "POST /v1/prelogin": ("public", lambda w, u: Call(json={"name": w.owner.name})),
    "POST /v1/login": ("public", _login),
    "POST /v1/logout": ("device", _logout),
    "GET /v1/devices": ("device", _nothing),
    "DELETE /v1/devices/{device}": ("device", _revoke_device),
    "GET /v1/users/{user}/key": ("device", lambda w, u: Call(params={"user": w.owner.name})),
    "GET /v1/spaces": ("device", _nothing),
    "POST /v1/spaces": ("device", _space_request),
    "POST /v1/changes": ("device", lambda w, u: Call(json={"cursors": {u.home: 0}})),
    "GET /v1/spaces/{space}": ("viewer", _nothing),
    "GET /v1/spaces/{space}/members": ("viewer", _nothing),
    "POST /v1/spaces/{space}/members": ("owner", _member_request),
    "DELETE /v1/spaces/{space}/members/{user}": ("viewer", _remove_member),
    "POST /v1/spaces/{space}/chunks/missing": (
        "editor", lambda w, u: Call(json={"ids": [w.chunk]})),
    "PUT /v1/spaces/{space}/chunks/{chunk}": ("editor", _put_chunk),
    "GET /v1/spaces/{space}/chunks/{chunk}": ("viewer", _nothing),
    "POST /v1/spaces/{space}/chunks/batch": ("editor", _put_batch),
    "POST /v1/spaces/{space}/chunks/fetch": (
        "viewer", lambda w, u: Call(json={"ids": [w.chunk]})),
    "POST /v1/spaces/{space}/commit": ("editor", _commit),
    "GET /v1/spaces/{space}/tree": ("viewer", _nothing),
    "GET /v1/spaces/{space}/nodes/{node}/versions": ("viewer", _nothing),
    "GET /v1/spaces/{space}/nodes/{node}/versions/{version}": ("viewer", _nothing),
    "GET /v1/spaces/{space}/trash": ("viewer", _nothing),
}


def recipe(w: World, op: Operation, caller: User) -> Call:
    return RECIPES[op.key][1](w, caller)


# ---------------------------------------------------------------------------- world


def _operations(doc: dict[str, Any]) -> list[Operation]:
    ops = []
    for path, methods in doc["paths"].items():
        for method, spec in methods.items():
            success = [int(code) for code in spec["responses"] if code.isdigit()]
            assert len(success) == 1, f"{method} {path}: one success status, not {success}"
            ops.append(Operation(method.upper(), path, bool(spec.get("security")),
                                 spec.get("x-loft-role"), success[0]))
    return ops


@pytest.fixture
def world(api: Api) -> Iterator[World]:
    r = api.http.get("/v1/openapi.json")
    assert r.status_code == 200, r.text
    owner, editor, viewer, stranger, spare = (api.signup() for _ in range(5))
    revoked = api.login(owner.name, device="revoked")
    assert api.post(revoked, "/v1/logout").status_code == 204
    chunk, _ = api.put_chunk(owner, owner.home, b"authz chunk")
    w = World(api=api, operations=_operations(r.json()), owner=owner, editor=editor,
              viewer=viewer, stranger=stranger, spare=spare, revoked_token=revoked.token,
              chunk=chunk)
    w.share(editor, "editor")
    w.share(viewer, "viewer")
    yield w


def _error(r: httpx.Response) -> tuple[int, str | None, str | None]:
    try:
        body = r.json()
    except ValueError:
        return r.status_code, None, None
    if not isinstance(body, dict):
        return r.status_code, None, None
    return r.status_code, body.get("code"), body.get("message")


def _check(problems: list[str], op: Operation, who: str, r: httpx.Response,
           status: int, code: str | None = None) -> None:
    got, got_code, message = _error(r)
    if got != status or (code is not None and (got_code != code or not message)):
        problems.append(f"{op.key} as {who}: want {status} {code or ''}, got {got} "
                        f"{r.text[:200]}")


# ---------------------------------------------------------------------------- tests


def test_openapi_every_operation_has_a_recipe(world: World):
    documented = {op.key for op in world.operations}
    assert documented - RECIPES.keys() == set(), "add these operations to RECIPES"
    assert RECIPES.keys() - documented == set(), "these recipes name no operation"
    for op in world.operations:
        assert op.role in (None, *ROLE_RANK), f"{op.key}: unknown role {op.role!r}"
        assert ("{space}" in op.path) == (op.role is not None), op.key
        assert op.secured or op.role is None, f"{op.key}: a role without a token"
    documented_access = {op.key: op.role or ("device" if op.secured else "public")
                         for op in world.operations}
    pinned = {key: access for key, (access, _) in RECIPES.items()}
    assert documented_access == pinned, "an operation's access changed: review, then pin it"


def test_authz_public_operations_need_no_token(world: World):
    public = [op for op in world.operations if not op.secured]
    assert {op.key for op in public} >= {"POST /v1/signup", "POST /v1/prelogin",
                                         "POST /v1/login", "GET /v1/openapi.json",
                                         "GET /v1/health"}
    problems: list[str] = []
    for op in public:
        r = world.send(op, recipe(world, op, world.owner), None)
        _check(problems, op, "nobody", r, op.success)
    assert not problems, "\n".join(problems)


def test_authz_secured_operations_refuse_missing_or_bad_tokens(world: World):
    bad = {
        "missing": None, "empty": "", "scheme only": "Bearer",
        "garbage": "Bearer lft_garbage", "revoked": f"Bearer {world.revoked_token}",
        "basic": "Basic dXNlcjpwYXNz", "valid token, other scheme": f"Token {world.owner.token}",
    }
    problems: list[str] = []
    for who, authorization in bad.items():
        for op in world.operations:
            if op.secured:
                r = world.send(op, recipe(world, op, world.owner), authorization)
                _check(problems, op, f"nobody ({who})", r, 401, "unauthorized")
    assert not problems, "\n".join(problems)
    # Nothing those calls carried took effect.
    api, owner = world.api, world.owner
    assert api.tree(owner, world.space) == {}
    assert [s["id"] for s in api.get(owner, "/v1/spaces").json()["spaces"]] == [owner.home]
    members = api.get(owner, f"/v1/spaces/{world.space}/members").json()["members"]
    assert sorted(m["role"] for m in members) == ["editor", "owner", "viewer"]
    devices = api.get(owner, "/v1/devices").json()["devices"]
    assert [d["revoked"] is None for d in devices] == [True, False]


def test_authz_strangers_cannot_tell_a_space_exists(world: World):
    problems: list[str] = []
    nowhere = str(uuid.uuid4())
    for op in world.operations:
        if op.role is None:
            continue
        theirs = world.call_as(op, world.stranger)
        _check(problems, op, "stranger", theirs, 404, "not_found")
        for who, caller in (("stranger", world.stranger), ("owner", world.owner)):
            absent = world.call_as(op, caller, space=nowhere)
            _check(problems, op, f"{who} on a missing space", absent, 404, "not_found")
            if _error(absent) != _error(theirs):
                problems.append(f"{op.key}: a stranger's answer {theirs.text} differs from "
                                f"a missing space's {absent.text}")
    assert not problems, "\n".join(problems)
    assert world.api.tree(world.owner, world.space) == {}


def test_authz_strangers_cannot_reach_a_space_through_the_feed_or_their_own_space(
        world: World):
    api, stranger = world.api, world.stranger
    r = api.post(stranger, "/v1/changes", json={"cursors": {world.space: 0}})
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    # Chunks are per space: knowing an id does not let a stranger read or reference it.
    r = api.get(stranger, f"/v1/spaces/{stranger.home}/chunks/{world.chunk}")
    assert (r.status_code, r.json()["code"]) == (404, "chunk_not_found")
    fetched = api.get_batch(stranger, stranger.home, [world.chunk])
    assert fetched == {world.chunk: None}
    r = api.commit(stranger, stranger.home, [{
        "op": "create", "node": new_id(), "parent": ROOT_NODE, "name": "stolen",
        "content": {"size": 11, "chunks": [[world.chunk, 11]]}}])
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    assert [d["code"] for d in r.json()["details"]] == ["missing_chunks"]


@pytest.mark.parametrize("member", ["viewer", "editor"])
def test_authz_members_are_refused_operations_above_their_role(world: World, member: str):
    caller: User = getattr(world, member)
    problems: list[str] = []
    for op in world.operations:
        if op.role is None:
            continue
        r = world.call_as(op, caller)
        if ROLE_RANK[op.role] > ROLE_RANK[member]:
            _check(problems, op, member, r, 403, "forbidden")
        else:
            _check(problems, op, member, r, op.success)
    assert not problems, "\n".join(problems)
    # The member is still a member with the same role (self-removal was undone).
    members = world.api.get(world.owner, f"/v1/spaces/{world.space}/members").json()
    assert {"user": caller.name, "role": member} in members["members"]


def test_authz_owner_may_call_every_secured_operation(world: World):
    """The recipes are valid requests: the owner gets each operation's success status."""
    problems: list[str] = []
    for op in world.operations:
        if op.secured:
            _check(problems, op, "owner", world.call_as(op, world.owner), op.success)
    assert not problems, "\n".join(problems)
