"""The metadata schema, as versioned migrations. Every table and column is documented
here, where it is defined.

Ids: users are integers; devices, spaces and nodes are UUID strings chosen by whoever
creates them (clients choose node ids, so a device can create files offline and refer
to them in later operations before the server has seen them). Chunk ids are 32 raw
bytes. Times are UNIX seconds (REAL). A seq is a position in one space's journal.

A node's history is never updated in place: entries carry the seq range in which they
existed and versions are immutable rows, so the tree of a space at any seq is a query,
not a replay.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    -- Server-wide settings. key 'secret': random bytes (hex) for answers that must not
    -- reveal whether an account exists.
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    -- One row per account.
    CREATE TABLE users (
        id                  INTEGER PRIMARY KEY,
        name                TEXT NOT NULL UNIQUE,   -- login name, [A-Za-z0-9_.@+-]{1,64}
        auth_hash           BLOB NOT NULL,          -- scrypt(auth key sent by client, auth_salt)
        auth_salt           BLOB NOT NULL,          -- random, server side
        kdf                 TEXT NOT NULL,          -- JSON KdfParams: how clients derive keys
        public_key          BLOB NOT NULL,          -- X25519 public key
        wrapped_private_key BLOB NOT NULL,          -- private key sealed under the client's KEK
        quota_bytes         INTEGER NOT NULL,       -- cap on used_bytes
        used_bytes          INTEGER NOT NULL DEFAULT 0,  -- sizes of current versions of live
                                                         -- files in spaces the user owns
        created             REAL NOT NULL
    );

    -- A logged-in device. Its bearer token is known only by its hash.
    CREATE TABLE devices (
        id         TEXT PRIMARY KEY,                -- UUID
        user_id    INTEGER NOT NULL REFERENCES users(id),
        name       TEXT NOT NULL,
        token_hash BLOB NOT NULL UNIQUE,            -- sha256 of the bearer token
        created    REAL NOT NULL,
        last_seen  REAL NOT NULL,                   -- refreshed at most once a minute
        revoked    REAL                             -- when revoked; NULL while valid
    );
    CREATE INDEX devices_user ON devices(user_id);

    -- A tree with its own key and journal: each user's home, and each shared folder.
    CREATE TABLE spaces (
        id      TEXT PRIMARY KEY,                   -- UUID
        owner   INTEGER NOT NULL REFERENCES users(id),  -- whose quota it uses
        name    TEXT NOT NULL,                      -- a label ('home' or the folder name)
        head    INTEGER NOT NULL DEFAULT 0,         -- last seq of the journal (0: empty)
        created REAL NOT NULL
    );

    -- Who may use a space, and how.
    CREATE TABLE memberships (
        space_id     TEXT NOT NULL REFERENCES spaces(id),
        user_id      INTEGER NOT NULL REFERENCES users(id),
        role         TEXT NOT NULL CHECK (role IN ('owner', 'editor', 'viewer')),
        wrapped_key  BLOB NOT NULL,                 -- the space key sealed to the user's
                                                    -- public key; the server cannot open it
        mount_parent TEXT,                          -- where the space appears in the user's
        mount_name   TEXT,                          -- home tree (NULL: the home itself)
        PRIMARY KEY (space_id, user_id)
    );
    CREATE INDEX memberships_user ON memberships(user_id);

    -- A file, directory, symlink or special file of a space. The root directory of every
    -- space is the nil UUID.
    CREATE TABLE nodes (
        space_id    TEXT NOT NULL,
        id          TEXT NOT NULL,                  -- UUID chosen by the creating client
        kind        TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink', 'special')),
        version     INTEGER NOT NULL,               -- seq of the current version
        size        INTEGER NOT NULL DEFAULT 0,     -- size of the current version (quota)
        deleted     INTEGER NOT NULL DEFAULT 0,     -- 1: no live entry (in the trash)
        created_seq INTEGER NOT NULL,
        PRIMARY KEY (space_id, id)
    ) WITHOUT ROWID;

    -- A name in a directory. A file may have several (hard links); a directory one.
    -- An entry existed for seqs in [created_seq, deleted_seq).
    CREATE TABLE entries (
        space_id    TEXT NOT NULL,
        parent      TEXT NOT NULL,                  -- directory node id
        name        TEXT NOT NULL,                  -- NFC, no '/', <= 255 bytes
        node        TEXT NOT NULL,
        created_seq INTEGER NOT NULL,
        deleted_seq INTEGER                         -- NULL while live
    );
    CREATE UNIQUE INDEX entries_live ON entries(space_id, parent, name)
        WHERE deleted_seq IS NULL;
    CREATE INDEX entries_node ON entries(space_id, node);
    CREATE INDEX entries_parent ON entries(space_id, parent, created_seq);

    -- Immutable records of a node's content and attributes. Every op that changes a node
    -- (create, update, setattr, restore) adds one, keyed by the op's seq.
    CREATE TABLE versions (
        space_id    TEXT NOT NULL,
        node        TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        time        REAL NOT NULL,
        device      TEXT NOT NULL,                  -- author device id
        size        INTEGER NOT NULL,
        mode        INTEGER NOT NULL,               -- permission bits (07777)
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        xattrs      TEXT NOT NULL,                  -- JSON {name: base64 value}
        target      TEXT,                           -- symlink target
        special     TEXT,                           -- fifo | socket | chr | blk
        rdev        INTEGER NOT NULL DEFAULT 0,
        content_seq INTEGER NOT NULL,               -- the version whose manifest this shares
                                                    -- (= seq when it has its own)
        manifest    BLOB,                           -- files, own content only: repeated
                                                    -- (32-byte chunk id, u32 BE length)
        PRIMARY KEY (space_id, node, seq)
    ) WITHOUT ROWID;

    -- Per space, a gap-free sequence of committed changes: the source of truth for sync.
    CREATE TABLE journal (
        space_id TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        change   TEXT NOT NULL,                     -- JSON protocol.Change
        PRIMARY KEY (space_id, seq)
    ) WITHOUT ROWID;

    -- Sealed chunk blobs present in the blob store, per space.
    CREATE TABLE chunks (
        space_id TEXT NOT NULL,
        id       BLOB NOT NULL,                     -- 32-byte keyed hash (opaque here)
        size     INTEGER NOT NULL,                  -- blob bytes
        refs     INTEGER NOT NULL DEFAULT 0,        -- versions whose own manifest names it
        touched  REAL NOT NULL,                     -- last put or has-check: GC grace
        PRIMARY KEY (space_id, id)
    ) WITHOUT ROWID;
    CREATE INDEX chunks_unreferenced ON chunks(touched) WHERE refs = 0;

    -- Applied commits by client-chosen id, so a retried commit is answered, not re-applied.
    CREATE TABLE commits (
        space_id  TEXT NOT NULL,
        commit_id TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq  INTEGER NOT NULL,
        seqs      TEXT NOT NULL,                    -- JSON: per op, its seq or null
        time      REAL NOT NULL,
        PRIMARY KEY (space_id, commit_id)
    ) WITHOUT ROWID;
    """,
]
