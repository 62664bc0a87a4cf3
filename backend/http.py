"""`HttpBackend`: the contract over HTTP/1.1 to a Loft server, with one httpx client.

This is the only module that sees httpx: its exceptions and status codes become the
`backend.base` error tree here (see `_translate` and `_rejection`). It retries nothing
and limits nothing beyond the connection pool; `backend.wrappers` stacks those.

Copies of chunk bodies are kept low: a put sends the caller's `bytes` as is; a batch put
streams its frames, passing large blobs through untouched and coalescing only small ones;
a get returns the body httpx assembled.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import blake3
import httpx
import trio
from pydantic import BaseModel, ValidationError

from backend.base import (
    BackendError,
    BadCredentials,
    BadRequest,
    BadResponse,
    ChunkMissing,
    CommitConflict,
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    Rejected,
    ServerFailure,
    TooLarge,
    Unauthorized,
    Unreachable,
    UserExists,
)
from backend.rawget import RawGetter
from loft.protocol import (
    API_PREFIX,
    DIGEST_HEADER,
    FRAME_DIGEST_BYTES,
    FRAME_HEAD,
    FRAME_MISSING,
    MAX_BATCH_BODY_BYTES,
    MAX_BLOB_BYTES,
    MAX_IDS_PER_REQUEST,
    MAX_READ_AHEAD_IDS,
    READ_AHEAD_HEADER,
    ChangesRequest,
    ChangesResponse,
    ChunkIds,
    CommitRequest,
    CommitResponse,
    CreateSpaceRequest,
    Device,
    DeviceList,
    ErrorCode,
    KdfParams,
    LoginRequest,
    LoginResponse,
    Member,
    MemberAddRequest,
    MemberList,
    NodeState,
    OpResult,
    PreloginRequest,
    PreloginResponse,
    SignupRequest,
    SpaceInfo,
    SpaceList,
    TrashList,
    TreeResponse,
    UserKey,
    VersionList,
)

M = TypeVar("M", bound=BaseModel)

#: Ids per batch-get request. The server refuses answers over MAX_BATCH_BODY_BYTES; a
#: refused request is split in halves, so this bounds only the common case.
FETCH_IDS = 256
#: Blobs at least this large travel in a batch put as their own piece, uncopied.
_PASS_THROUGH = 64 * 1024
#: Small frames are coalesced into pieces of about this size.
_PIECE = 1024 * 1024
#: Hash in a worker thread above this many bytes (blake3 releases the GIL).
_THREAD_HASH = 256 * 1024

_FRAME_OVERHEAD = FRAME_HEAD.size + FRAME_DIGEST_BYTES
_JSON = {"content-type": "application/json"}
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


def _seg(value: str) -> str:
    """One path segment, quoted so that no value can reach another endpoint."""
    return quote(value, safe="")


def _build(cls: type[M], **fields: Any) -> M:
    """A request model from the caller's values; invalid values are a `BadRequest`,
    as if the server had refused them."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise BadRequest(400, ErrorCode.INVALID, str(exc)) from None


def _check_size(blob: bytes) -> None:
    # Refused here rather than by the server: it answers before reading the body, and a
    # client still writing a large body may stall until its write timeout instead of
    # seeing the 413.
    if len(blob) > MAX_BLOB_BYTES:
        raise TooLarge(
            413, ErrorCode.TOO_LARGE, f"a chunk is at most {MAX_BLOB_BYTES} bytes, not {len(blob)}"
        )


def _digests(blobs: list[bytes]) -> list[bytes]:
    return [blake3.blake3(b).digest() for b in blobs]


async def _in_thread_if_big(size: int, fn: Callable[[], Any]) -> Any:
    if size >= _THREAD_HASH:
        return await trio.to_thread.run_sync(fn)
    return fn()


def _batches_for_put(items: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Groups items so that each request body stays within the server's limits."""
    batches: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for item in items:
        frame = _FRAME_OVERHEAD + len(item[1])
        if current and (size + frame > MAX_BATCH_BODY_BYTES or len(current) >= MAX_IDS_PER_REQUEST):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += frame
    if current:
        batches.append(current)
    return batches


def _frame_pieces(items: list[tuple[str, bytes]], digests: list[bytes]) -> list[bytes]:
    """The batch-put body as a list of pieces: large blobs as they are, everything else
    coalesced."""
    pieces: list[bytes] = []
    small = bytearray()
    for (chunk_id, blob), digest in zip(items, digests, strict=True):
        small += FRAME_HEAD.pack(bytes.fromhex(chunk_id), len(blob))
        small += digest
        if len(blob) >= _PASS_THROUGH:
            pieces.append(bytes(small))
            small.clear()
            pieces.append(blob)
        else:
            small += blob
            if len(small) >= _PIECE:
                pieces.append(bytes(small))
                small.clear()
    if small:
        pieces.append(bytes(small))
    return pieces


class _Pieces:
    """A body made of ready pieces; httpx sends each as it is, without joining them.
    (A plain iterator rather than an async generator: nothing to finalize when a
    request fails halfway.)"""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = iter(pieces)

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._pieces)
        except StopIteration:
            raise StopAsyncIteration from None


def _parse_frames(body: bytes, wanted: list[str]) -> dict[str, bytes | None]:
    """Splits a batch-get answer; every id asked for must be answered, and only those."""
    out: dict[str, bytes | None] = {}
    pos, end = 0, len(body)
    while pos < end:
        if pos + FRAME_HEAD.size > end:
            raise BadResponse("truncated frame header in a batch-get answer")
        raw_id, length = FRAME_HEAD.unpack_from(body, pos)
        pos += FRAME_HEAD.size
        if length == FRAME_MISSING:
            out[raw_id.hex()] = None
            continue
        if pos + length > end:
            raise BadResponse("truncated frame body in a batch-get answer")
        out[raw_id.hex()] = body[pos : pos + length]
        pos += length
    if out.keys() != set(wanted):
        raise BadResponse("a batch-get answer does not match the ids asked for")
    return out


def _rejection(status: int, body: bytes) -> Rejected:
    """The `Rejected` subclass for a 4xx answer."""
    code, message, details = "", "", None
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            code = str(parsed.get("code", ""))
            message = str(parsed.get("message", ""))
            details = parsed.get("details")
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    if code == ErrorCode.QUOTA_EXCEEDED:
        return QuotaExceeded(status, code, message)
    if status == 401:
        cls: type[Rejected] = BadCredentials if code == ErrorCode.BAD_CREDENTIALS else Unauthorized
        return cls(status, code, message)
    if status == 403:
        return Forbidden(status, code, message)
    if status == 404:
        cls = ChunkMissing if code == ErrorCode.CHUNK_NOT_FOUND else NotFound
        return cls(status, code, message)
    if status == 409:
        if code == ErrorCode.USER_EXISTS:
            return UserExists(status, code, message)
        if code == ErrorCode.CONFLICT and isinstance(details, list):
            try:
                results = [OpResult.model_validate(d) for d in details]
            except ValidationError:
                raise BadResponse("a commit conflict with malformed results") from None
            return CommitConflict(results, message)
        return Conflict(status, code, message)
    if status == 413:
        return TooLarge(status, code, message)
    return BadRequest(status, code, message)


class HttpBackend:
    """The contract (`backend.base.Backend`) over HTTP to the server at `url`.

    One `httpx.AsyncClient` with up to `max_connections` connections; `timeout` bounds
    connecting and each read and write (a long-poll's read gets its `wait` on top).

    Counters, for tests and status: `bytes_sent` and `bytes_received` count chunk bodies
    (blob bytes, not framing) the server answered for; `wire_bytes_sent` and
    `wire_bytes_received` count every request and response body; `requests` counts
    requests sent, by kind (the method name).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        max_connections: int = 8,
        timeout: float = 30.0,
    ) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._token = token
        self._timeout = timeout
        self._prefix = base.path.rstrip("/") + API_PREFIX
        # plain-HTTP chunk GETs skip httpx (see rawget.py); TLS stays with httpx
        self._raw = (RawGetter(base.host, base.port or 80, timeout)
                     if base.scheme == "http" else None)
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/") + API_PREFIX,
            # A request waits for a free connection as long as it takes: the ones in use
            # are bounded by their own timeouts, and a busy pool is not an offline server.
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0
        self.requests: Counter[str] = Counter()
        #: chunk ids named in read-ahead headers (see `get_chunk`)
        self.read_ahead_ids = 0

    def set_token(self, token: str | None) -> None:
        """The device token sent from now on (None: none)."""
        self._token = token

    async def aclose(self) -> None:
        if self._raw is not None:
            self._raw.close()
        await self._client.aclose()

    # ------------------------------------------------------------------ transport

    async def _send(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        stream: list[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        hold: float = 0.0,
    ) -> httpx.Response:
        """Sends one request and returns its 2xx answer; everything else is raised as
        the error tree. `stream` sends a body made of pieces, without joining them;
        `hold` is how long the server may hold the answer back (a long-poll)."""
        all_headers = dict(headers or {})
        if self._token is not None:
            all_headers["authorization"] = f"Bearer {self._token}"
        if body is not None:
            # httpx streams a bytes body through an async generator, which is left
            # unfinalized when the request is cancelled (a session closing under a
            # long-poll); a plain iterator has nothing to finalize
            stream = [body]
        content: _Pieces | None = None
        size = 0
        if stream is not None:
            size = sum(len(p) for p in stream)
            all_headers["content-length"] = str(size)
            content = _Pieces(stream)
        self.requests[kind] += 1
        extra: dict[str, Any] = {}
        if hold:
            extra["timeout"] = httpx.Timeout(self._timeout, read=self._timeout + hold, pool=None)
        try:
            response = await self._client.request(
                method, path, content=content, headers=all_headers, params=params, **extra
            )
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        self.wire_bytes_sent += size
        self.wire_bytes_received += len(response.content)
        status = response.status_code
        if 200 <= status < 300:
            return response
        if status in (502, 503, 504):
            raise Unreachable(f"{method} {path}: {status} {_message(response)}", status)
        if status >= 500:
            raise ServerFailure(status, _message(response))
        if 400 <= status < 500:
            raise _rejection(status, response.content)
        raise BadResponse(f"{method} {path}: unexpected status {status}")

    async def _json(
        self,
        kind: str,
        method: str,
        path: str,
        model: type[M],
        body: BaseModel | None = None,
        **kw: Any,
    ) -> M:
        response = await self._send(
            kind,
            method,
            path,
            body=None if body is None else body.model_dump_json().encode(),
            headers=None if body is None else _JSON,
            **kw,
        )
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise BadResponse(f"{method} {path}: not a {model.__name__}: {exc}") from None

    async def _empty(self, kind: str, method: str, path: str) -> None:
        await self._send(kind, method, path)

    # ------------------------------------------------------------------ accounts

    async def prelogin(self, name: str) -> KdfParams:
        req = _build(PreloginRequest, name=name)
        answer = await self._json("prelogin", "POST", "/prelogin", PreloginResponse, req)
        return answer.kdf

    async def signup(self, req: SignupRequest) -> LoginResponse:
        return await self._json("signup", "POST", "/signup", LoginResponse, req)

    async def login(self, req: LoginRequest) -> LoginResponse:
        return await self._json("login", "POST", "/login", LoginResponse, req)

    async def logout(self) -> None:
        await self._empty("logout", "POST", "/logout")

    async def devices(self) -> list[Device]:
        return (await self._json("devices", "GET", "/devices", DeviceList)).devices

    async def revoke(self, device_id: str) -> None:
        await self._empty("revoke", "DELETE", f"/devices/{_seg(device_id)}")

    async def user_key(self, name: str) -> bytes:
        answer = await self._json("user_key", "GET", f"/users/{_seg(name)}/key", UserKey)
        return answer.public_key

    # ------------------------------------------------------------------ spaces

    async def spaces(self) -> list[SpaceInfo]:
        return (await self._json("spaces", "GET", "/spaces", SpaceList)).spaces

    async def space(self, space_id: str) -> SpaceInfo:
        return await self._json("space", "GET", f"/spaces/{_seg(space_id)}", SpaceInfo)

    async def create_space(self, req: CreateSpaceRequest) -> SpaceInfo:
        return await self._json("create_space", "POST", "/spaces", SpaceInfo, req)

    async def members(self, space: str) -> list[Member]:
        path = f"/spaces/{_seg(space)}/members"
        return (await self._json("members", "GET", path, MemberList)).members

    async def add_member(self, space: str, req: MemberAddRequest) -> Member:
        path = f"/spaces/{_seg(space)}/members"
        return await self._json("add_member", "POST", path, Member, req)

    async def remove_member(self, space: str, user: str) -> None:
        path = f"/spaces/{_seg(space)}/members/{_seg(user)}"
        await self._empty("remove_member", "DELETE", path)

    # ------------------------------------------------------------------ chunks

    async def missing(self, space: str, ids: list[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        path = f"/spaces/{_seg(space)}/chunks/missing"
        out: list[str] = []
        for i in range(0, len(wanted), MAX_IDS_PER_REQUEST):
            req = _build(ChunkIds, ids=wanted[i : i + MAX_IDS_PER_REQUEST])
            out += (await self._json("missing", "POST", path, ChunkIds, req)).ids
        return out

    async def put_chunk(self, space: str, chunk_id: str, blob: bytes) -> None:
        if not isinstance(blob, bytes):
            blob = bytes(blob)  # httpx sends only bytes as one body
        _check_size(blob)
        digest = await _in_thread_if_big(len(blob), lambda: blake3.blake3(blob).hexdigest())
        await self._send(
            "put_chunk",
            "PUT",
            f"/spaces/{_seg(space)}/chunks/{_seg(chunk_id)}",
            body=blob,
            headers={DIGEST_HEADER: digest, "content-type": "application/octet-stream"},
        )
        self.bytes_sent += len(blob)

    async def put_chunks(self, space: str, items: list[tuple[str, bytes]]) -> None:
        unique: dict[str, bytes] = {}
        for chunk_id, blob in items:
            if not _HEX_ID.match(chunk_id):
                # FRAME_HEAD would silently pad or cut a malformed id.
                raise BadRequest(400, ErrorCode.INVALID, f"not a chunk id: {chunk_id!r}")
            _check_size(blob)
            unique.setdefault(chunk_id, blob if isinstance(blob, bytes) else bytes(blob))
        path = f"/spaces/{_seg(space)}/chunks/batch"
        for batch in _batches_for_put(list(unique.items())):
            size = sum(len(b) for _, b in batch)
            digests = await _in_thread_if_big(size, partial(_digests, [b for _, b in batch]))
            await self._send(
                "put_chunks",
                "POST",
                path,
                stream=_frame_pieces(batch, digests),
                headers={"content-type": "application/octet-stream"},
            )
            self.bytes_sent += size

    @property
    def last_byte(self) -> float | None:
        """trio.current_time() when the server last sent bytes of a chunk download; None
        where that is not followed (TLS goes through httpx)."""
        return self._raw.last_byte if self._raw is not None else None

    async def get_chunk(self, space: str, chunk_id: str, ahead: Sequence[str] = ()) -> bytes:
        path = f"/spaces/{_seg(space)}/chunks/{_seg(chunk_id)}"
        ahead = ahead[:MAX_READ_AHEAD_IDS]
        hint = {READ_AHEAD_HEADER: ",".join(ahead)} if ahead else {}
        self.read_ahead_ids += len(ahead)
        if self._raw is None:
            blob = (await self._send("get_chunk", "GET", path, headers=hint)).content
        else:
            self.requests["get_chunk"] += 1
            headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
            headers.update(hint)
            status, blob = await self._raw.get(self._prefix + path, headers)
            self.wire_bytes_received += len(blob)
            if status in (502, 503, 504):
                raise Unreachable(f"GET {path}: {status}", status)
            if status >= 500:
                raise ServerFailure(status, blob[:200].decode("utf-8", "replace"))
            if 400 <= status < 500:
                raise _rejection(status, blob)
            if status != 200:
                raise BadResponse(f"GET {path}: unexpected status {status}")
        self.bytes_received += len(blob)
        return blob

    async def get_chunks(self, space: str, ids: list[str]) -> dict[str, bytes | None]:
        wanted = list(dict.fromkeys(ids))
        out: dict[str, bytes | None] = {}
        for i in range(0, len(wanted), FETCH_IDS):
            out.update(await self._fetch(space, wanted[i : i + FETCH_IDS]))
        return out

    async def _fetch(self, space: str, ids: list[str]) -> dict[str, bytes | None]:
        """One batch-get request, split in halves while the answer would be too large."""
        req = _build(ChunkIds, ids=ids)
        try:
            response = await self._send(
                "get_chunks",
                "POST",
                f"/spaces/{_seg(space)}/chunks/fetch",
                body=req.model_dump_json().encode(),
                headers=_JSON,
            )
        except TooLarge:
            if len(ids) == 1:
                raise
            half = len(ids) // 2
            return {**await self._fetch(space, ids[:half]), **await self._fetch(space, ids[half:])}
        out = _parse_frames(response.content, ids)
        self.bytes_received += sum(len(b) for b in out.values() if b is not None)
        return out

    # ------------------------------------------------------------------ sync

    async def commit(self, space: str, req: CommitRequest) -> CommitResponse:
        path = f"/spaces/{_seg(space)}/commit"
        return await self._json("commit", "POST", path, CommitResponse, req)

    async def changes(
        self, cursors: dict[str, int], wait: float = 0.0, limit: int = 1000
    ) -> ChangesResponse:
        req = _build(ChangesRequest, cursors=cursors, wait=wait, limit=limit)
        return await self._json("changes", "POST", "/changes", ChangesResponse, req, hold=req.wait)

    async def tree(
        self,
        space: str,
        at: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> TreeResponse:
        params = {
            k: v for k, v in (("at", at), ("after", after), ("limit", limit)) if v is not None
        }
        path = f"/spaces/{_seg(space)}/tree"
        return await self._json("tree", "GET", path, TreeResponse, params=params)

    async def versions(self, space: str, node: str) -> VersionList:
        path = f"/spaces/{_seg(space)}/nodes/{_seg(node)}/versions"
        return await self._json("versions", "GET", path, VersionList)

    async def version(self, space: str, node: str, seq: int) -> NodeState:
        path = f"/spaces/{_seg(space)}/nodes/{_seg(node)}/versions/{int(seq)}"
        return await self._json("version", "GET", path, NodeState)

    async def trash(self, space: str) -> TrashList:
        return await self._json("trash", "GET", f"/spaces/{_seg(space)}/trash", TrashList)


def _message(response: httpx.Response) -> str:
    try:
        parsed = json.loads(response.content)
        if isinstance(parsed, dict) and "message" in parsed:
            return str(parsed["message"])
    except ValueError:
        pass
    return response.reason_phrase or "server failure"


def _translate(exc: httpx.HTTPError) -> BackendError:
    """The error-tree class of an httpx failure: the one place httpx errors end up."""
    where = ""
    try:
        where = f"{exc.request.method} {exc.request.url}: "
    except RuntimeError:  # no request attached
        pass
    text = f"{where}{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(
        exc,
        httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError,
    ):
        return Unreachable(text)
    if isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects):
        return BadResponse(text)
    return BackendError(text)
