"""The wire protocol shared by server and client: pydantic models of every JSON body.

JSON over HTTP/1.1 under `/v1`. Binary values travel as standard base64 strings; chunk
ids as 64 lowercase hex digits; node and space ids as lowercase UUID strings. Chunk
bodies are not JSON: see `FRAME_*` for the framing of batch requests.

Errors are `ErrorBody` with a stable `code` (see `ErrorCode`); a rejected commit
carries one `OpResult` per operation in `details`.

Nothing here knows about storage or keys; the only logic is validation of names and
ids, which both sides must agree on.
"""

from __future__ import annotations

import base64
import binascii
import enum
import struct
import unicodedata
from typing import Annotated, Any, Literal, NewType

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

API_PREFIX = "/v1"

ChunkId = NewType("ChunkId", str)
NodeId = NewType("NodeId", str)
SpaceId = NewType("SpaceId", str)
Seq = NewType("Seq", int)

#: The root directory of every space has this node id.
ROOT_NODE = NodeId("00000000-0000-0000-0000-000000000000")

MAX_NAME_BYTES = 255
MAX_CHUNK_PLAINTEXT = 4 * 1024 * 1024
#: A sealed chunk is its plaintext (at worst) plus a header and an AEAD tag.
MAX_BLOB_BYTES = MAX_CHUNK_PLAINTEXT + 1024
MAX_JSON_BYTES = 1024 * 1024
#: Commits and id lists are batches and have their own body limit.
MAX_BATCH_JSON_BYTES = 64 * 1024 * 1024
MAX_BATCH_BODY_BYTES = 64 * 1024 * 1024
MAX_OPS_PER_COMMIT = 10_000
MAX_IDS_PER_REQUEST = 10_000
MAX_CHANGES_PER_PAGE = 5_000
MAX_LONG_POLL_SECONDS = 60.0

#: Header carrying the BLAKE3 digest (hex) of a chunk body, for transport integrity.
DIGEST_HEADER = "loft-digest"
#: Header of a chunk GET naming, comma-separated, the chunks of the same space the
#: client will ask for next (a sequential read): the server starts reading them from
#: its disk while it answers. A hint: the server acts on the first `MAX_READ_AHEAD_IDS`
#: well-formed ids of a GET that found its chunk and ignores the rest, missing ones
#: included; it never fails the GET.
READ_AHEAD_HEADER = "loft-read-ahead"
MAX_READ_AHEAD_IDS = 32

#: Batch frames: chunk id (32 bytes), body length (u32 big-endian), BLAKE3 digest of the
#: body (32 bytes, put only), body. In a batch-get answer a missing chunk has length
#: `FRAME_MISSING` and no digest or body.
FRAME_HEAD = struct.Struct(">32sI")
FRAME_DIGEST_BYTES = 32
FRAME_MISSING = 0xFFFFFFFF


class ErrorCode(enum.StrEnum):
    """Stable error codes. Clients branch on these, never on messages."""

    BAD_JSON = "bad_json"
    INVALID = "invalid_request"
    BAD_NAME = "bad_name"
    UNAUTHORIZED = "unauthorized"
    BAD_CREDENTIALS = "bad_credentials"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    DIGEST_MISMATCH = "digest_mismatch"
    USER_EXISTS = "user_exists"
    CONFLICT = "conflict"
    QUOTA_EXCEEDED = "quota_exceeded"
    CHUNK_NOT_FOUND = "chunk_not_found"
    INTERNAL = "internal_error"


class OpCode(enum.StrEnum):
    """Why one operation of a commit was refused."""

    OK = "ok"
    STALE_BASE = "stale_base"
    NAME_TAKEN = "name_taken"
    NO_SUCH_NODE = "no_such_node"
    NO_SUCH_ENTRY = "no_such_entry"
    NODE_EXISTS = "node_exists"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_EMPTY = "not_empty"
    MISSING_CHUNKS = "missing_chunks"
    CYCLE = "cycle"
    INVALID = "invalid_op"
    QUOTA_EXCEEDED = "quota_exceeded"


# ---------------------------------------------------------------------------- values


def _b64decode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None


B64 = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
    WithJsonSchema({"type": "string", "format": "byte"}),
]


def check_name(name: str) -> str:
    """Returns `name` if it may name an entry: NFC UTF-8, 1..255 bytes, no '/' or NUL,
    not '.' or '..'. Raises ValueError (with the reason) otherwise."""
    if name in ("", ".", ".."):
        raise ValueError("name may not be empty, '.' or '..'")
    if "/" in name or "\x00" in name:
        raise ValueError("name may not contain '/' or NUL")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("name is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError(f"name is longer than {MAX_NAME_BYTES} bytes")
    if unicodedata.normalize("NFC", name) != name:
        raise ValueError("name is not in Unicode NFC form")
    return name


Name = Annotated[str, AfterValidator(check_name)]
UserName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@+-]+$")]
DeviceName = Annotated[str, Field(min_length=1, max_length=128)]
HexChunkId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Uuid = Annotated[
    str,
    Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
]
SeqValue = Annotated[int, Field(ge=0, le=2**62)]
Size = Annotated[int, Field(ge=0, le=2**50)]
Role = Literal["owner", "editor", "viewer"]
NodeKind = Literal["file", "dir", "symlink", "special"]
SpecialKind = Literal["fifo", "socket", "chr", "blk"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- errors


class OpResult(Model):
    index: int
    code: OpCode
    message: str = ""
    #: The node's current version when the base was stale.
    current: SeqValue | None = None


class ErrorBody(Model):
    code: ErrorCode
    message: str
    details: list[OpResult] | None = None


# ---------------------------------------------------------------------------- accounts


class KdfParams(Model):
    """How a client turns the password into its master secret."""

    alg: Literal["scrypt"] = "scrypt"
    salt: B64
    n: Annotated[int, Field(ge=2**10, le=2**22)]
    r: Annotated[int, Field(ge=1, le=32)]
    p: Annotated[int, Field(ge=1, le=16)]


class SignupRequest(Model):
    name: UserName
    #: Derived from the password on the client; the server stores only a slow hash.
    auth_key: Annotated[B64, Field(min_length=32, max_length=64)]
    kdf: KdfParams
    public_key: Annotated[B64, Field(min_length=32, max_length=32)]
    #: The private key sealed under the key-encryption key, which never leaves devices.
    wrapped_private_key: Annotated[B64, Field(max_length=1024)]
    #: The home space key sealed to `public_key`.
    home_space_key: Annotated[B64, Field(max_length=1024)]
    device_name: DeviceName


class LoginResponse(Model):
    user_id: int
    user: UserName
    device_id: Uuid
    token: str
    public_key: B64
    wrapped_private_key: B64
    home_space: Uuid


class PreloginRequest(Model):
    name: UserName


class PreloginResponse(Model):
    kdf: KdfParams


class LoginRequest(Model):
    name: UserName
    auth_key: Annotated[B64, Field(min_length=32, max_length=64)]
    device_name: DeviceName


class Device(Model):
    id: Uuid
    name: str
    created: float
    last_seen: float
    revoked: float | None
    current: bool


class DeviceList(Model):
    devices: list[Device]


class UserKey(Model):
    name: UserName
    public_key: B64


# ---------------------------------------------------------------------------- spaces


class SpaceInfo(Model):
    id: Uuid
    name: str
    owner: UserName
    role: Role
    #: The space key sealed to the caller's public key.
    wrapped_key: B64
    head: SeqValue
    #: Where the space appears in the caller's tree (None for the home space).
    mount_parent: Uuid | None = None
    mount_name: str | None = None


class SpaceList(Model):
    spaces: list[SpaceInfo]


class CreateSpaceRequest(Model):
    name: Annotated[str, Field(min_length=1, max_length=255)]
    wrapped_key: Annotated[B64, Field(max_length=1024)]


class MemberAddRequest(Model):
    user: UserName
    role: Literal["editor", "viewer"]
    wrapped_key: Annotated[B64, Field(max_length=1024)]


class Member(Model):
    user: UserName
    role: Role


class MemberList(Model):
    members: list[Member]


# ---------------------------------------------------------------------------- chunks


class ChunkIds(Model):
    ids: Annotated[list[HexChunkId], Field(max_length=MAX_IDS_PER_REQUEST)]


class PutResult(Model):
    stored: int
    bytes: int


# ---------------------------------------------------------------------------- nodes


class Attrs(Model):
    mode: Annotated[int, Field(ge=0, le=0o7777)] = 0o644
    uid: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    gid: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    mtime_ns: Annotated[int, Field(ge=-(2**62), le=2**62)] = 0
    xattrs: Annotated[dict[Annotated[str, Field(max_length=255)], B64], Field(max_length=256)] = {}


ChunkRef = tuple[HexChunkId, Annotated[int, Field(ge=1, le=MAX_CHUNK_PLAINTEXT)]]


class Content(Model):
    """A file's bytes: the concatenation of its chunks' plaintexts."""

    size: Size
    chunks: list[ChunkRef] = []


class NodeState(Model):
    """A node as of one version."""

    node: Uuid
    kind: NodeKind
    version: SeqValue
    attrs: Attrs
    size: Size = 0
    #: None in a setattr change: the content is that of the node's previous version.
    chunks: list[ChunkRef] | None = []
    target: str | None = None
    special: SpecialKind | None = None
    rdev: int = 0


# ---------------------------------------------------------------------------- commit ops
# Each op names what it expects: `base` is the version it was derived from; entry ops
# name the entry (parent, name) and the node that entry must still lead to.


class MkdirOp(Model):
    op: Literal["mkdir"] = "mkdir"
    node: Uuid
    parent: Uuid
    name: Name
    attrs: Attrs = Attrs(mode=0o755)


class CreateOp(Model):
    op: Literal["create"] = "create"
    node: Uuid
    parent: Uuid
    name: Name
    attrs: Attrs = Attrs()
    content: Content = Content(size=0)


class SymlinkOp(Model):
    op: Literal["symlink"] = "symlink"
    node: Uuid
    parent: Uuid
    name: Name
    target: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]
    attrs: Attrs = Attrs(mode=0o777)


class SpecialOp(Model):
    op: Literal["special"] = "special"
    node: Uuid
    parent: Uuid
    name: Name
    special: SpecialKind
    rdev: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    attrs: Attrs = Attrs()


class UpdateOp(Model):
    op: Literal["update"] = "update"
    node: Uuid
    base: SeqValue
    content: Content
    attrs: Attrs | None = None


class SetattrOp(Model):
    op: Literal["setattr"] = "setattr"
    node: Uuid
    base: SeqValue
    attrs: Attrs


class MoveOp(Model):
    """Moves the entry (parent, name) → node to (new_parent, new_name). If the target
    name is taken, `replace` must name the node it leads to (rename-over), or, with
    `exchange`, the two entries swap."""

    op: Literal["move"] = "move"
    node: Uuid
    parent: Uuid
    name: Name
    new_parent: Uuid
    new_name: Name
    replace: Uuid | None = None
    exchange: bool = False


class LinkOp(Model):
    op: Literal["link"] = "link"
    node: Uuid
    parent: Uuid
    name: Name


class UnlinkOp(Model):
    """Removes the entry; when it was the node's last, the node goes to the trash.
    `base` guards against deleting an edit this device has not seen."""

    op: Literal["unlink"] = "unlink"
    node: Uuid
    parent: Uuid
    name: Name
    base: SeqValue


class RmdirOp(Model):
    op: Literal["rmdir"] = "rmdir"
    node: Uuid
    parent: Uuid
    name: Name


class RestoreOp(Model):
    """Makes `version` the node's current content again. A node in the trash comes back
    under its last name (or `parent`/`name` when given)."""

    op: Literal["restore"] = "restore"
    node: Uuid
    version: SeqValue
    base: SeqValue | None = None
    parent: Uuid | None = None
    name: Name | None = None


Op = Annotated[
    MkdirOp
    | CreateOp
    | SymlinkOp
    | SpecialOp
    | UpdateOp
    | SetattrOp
    | MoveOp
    | LinkOp
    | UnlinkOp
    | RmdirOp
    | RestoreOp,
    Field(discriminator="op"),
]


class CommitRequest(Model):
    #: Chosen by the client; a retried commit with the same id is answered, not re-applied.
    commit_id: Uuid
    ops: Annotated[list[Op], Field(min_length=1, max_length=MAX_OPS_PER_COMMIT)]


class CommitResponse(Model):
    first_seq: SeqValue
    last_seq: SeqValue
    #: Per op, the seq it was journaled at (None: it changed nothing, e.g. a no-op move).
    #: For ops that make a version (create, update, setattr, ...) this is the new version.
    seqs: list[SeqValue | None]
    replayed: bool = False


# ---------------------------------------------------------------------------- sync


class Change(Model):
    """One journal entry: what one op did, with the node's new state when it has one."""

    seq: SeqValue
    time: float
    device: str
    op: str
    node: Uuid
    #: The entry the op added (create, mkdir, link, ...) or removed/moved from.
    parent: Uuid | None = None
    name: str | None = None
    new_parent: Uuid | None = None
    new_name: str | None = None
    #: A move over an existing entry: the node that entry led to.
    replaced: Uuid | None = None
    exchange: bool = False
    #: True when the node lost its last entry (it is in the trash).
    deleted: bool = False
    state: NodeState | None = None


class ChangesRequest(Model):
    cursors: Annotated[dict[Uuid, SeqValue], Field(max_length=10_000)]
    wait: Annotated[float, Field(ge=0, le=MAX_LONG_POLL_SECONDS)] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_CHANGES_PER_PAGE)] = 1000


class SpaceChanges(Model):
    changes: list[Change]
    #: The seq to send as the cursor next time.
    cursor: SeqValue
    more: bool


class ChangesResponse(Model):
    spaces: dict[str, SpaceChanges]
    #: Spaces the caller belongs to that the request did not name (e.g. newly shared).
    unknown_spaces: list[str] = []


class EntryRef(Model):
    parent: Uuid
    name: str


class TreeNode(Model):
    state: NodeState
    entries: list[EntryRef]


class TreeResponse(Model):
    space: Uuid
    #: The seq this tree is the state at.
    seq: SeqValue
    nodes: list[TreeNode]
    #: Pass as `after` for the next page; None on the last page.
    next: str | None = None


class VersionInfo(Model):
    version: SeqValue
    time: float
    device: str
    kind: NodeKind
    size: Size
    mtime_ns: int
    current: bool


class VersionList(Model):
    node: Uuid
    deleted: bool
    versions: list[VersionInfo]


class TrashItem(Model):
    node: Uuid
    parent: Uuid
    name: str
    deleted_seq: SeqValue
    version: SeqValue
    size: Size


class TrashList(Model):
    items: list[TrashItem]
