"""The pyfuse3 adapter: each handler unpacks its arguments, calls one method of the
POSIX core (fs/core.py), converts the result, and runs inside `errnos()`, the one
error table (fs/errors.py).

Timeouts: the kernel may answer lookups and stats from its caches for ENTRY_TIMEOUT /
ATTR_TIMEOUT seconds; remote changes drop those caches at once (fs/notify.py), so the
timeouts only bound how stale a missed invalidation can make things.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Sequence

import pyfuse3
import trio

from fs.core import Attrs, Core
from fs.errors import errnos

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0


def entry(attrs: Attrs) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attrs.ino
    e.generation = 0
    e.entry_timeout = ENTRY_TIMEOUT
    e.attr_timeout = ATTR_TIMEOUT
    e.st_mode = attrs.mode
    e.st_nlink = attrs.nlink
    e.st_uid = attrs.uid
    e.st_gid = attrs.gid
    e.st_rdev = attrs.rdev
    e.st_size = attrs.size
    e.st_blksize = attrs.blksize
    e.st_blocks = attrs.blocks
    e.st_atime_ns = attrs.atime_ns
    e.st_mtime_ns = attrs.mtime_ns
    e.st_ctime_ns = attrs.ctime_ns
    return e


def _mode(mode: int, ctx: pyfuse3.RequestContext) -> int:
    return mode & ~ctx.umask


def _write_only(flags: int) -> bool:
    """Whether a handle bypasses the kernel's page cache (direct I/O): those opened
    write-only, as `cp`, `>` and downloads open them. Their writes then go from the
    writer's memory to the mount with no page cache copy, which here cost the writer
    2.1-2.9 s of kernel time per GiB (fresh pages for the file's cache, which nothing
    would read: the store holds the written pages). A write-only handle cannot be
    mapped, so mmap is unaffected; the kernel drops the range a direct write covers
    from the file's page cache, so a reader that holds the file open reads the new
    bytes (seen on Linux 6.18 even with the mtime left unchanged; a mount test checks
    that the reader sees them)."""
    return flags & os.O_ACCMODE == os.O_WRONLY


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core
        core.present_entries_as(entry)  # readdir replies with kept EntryAttributes
        #: set once the kernel's handshake is answered (pyfuse3 calls init() just before)
        self.initialized = trio.Event()

    def init(self):
        self.initialized.set()

    async def lookup(self, parent_inode, name, ctx):
        with errnos("lookup"):
            return entry(self.core.lookup(parent_inode, name))

    async def forget(self, inode_list):
        with errnos("forget"):
            self.core.forget(list(inode_list))

    async def getattr(self, inode, ctx):
        with errnos("getattr"):
            return entry(self.core.getattr(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        with errnos("setattr"):
            return entry(
                await self.core.setattr(
                    inode,
                    mode=attr.st_mode if fields.update_mode else None,
                    uid=attr.st_uid if fields.update_uid else None,
                    gid=attr.st_gid if fields.update_gid else None,
                    size=attr.st_size if fields.update_size else None,
                    mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                    fh=fh,
                )
            )

    async def readlink(self, inode, ctx):
        with errnos("readlink"):
            return self.core.readlink(inode)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        with errnos("mknod"):
            return entry(
                self.core.mknod(parent_inode, name, _mode(mode, ctx), rdev, ctx.uid, ctx.gid)
            )

    async def mkdir(self, parent_inode, name, mode, ctx):
        with errnos("mkdir"):
            return entry(self.core.mkdir(parent_inode, name, _mode(mode, ctx), ctx.uid, ctx.gid))

    async def unlink(self, parent_inode, name, ctx):
        with errnos("unlink"):
            self.core.unlink(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        with errnos("rmdir"):
            self.core.rmdir(parent_inode, name)

    async def symlink(self, parent_inode, name, target, ctx):
        with errnos("symlink"):
            return entry(self.core.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        with errnos("rename"):
            if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
                raise pyfuse3.FUSEError(errno.EINVAL)  # e.g. RENAME_WHITEOUT
            self.core.rename(
                parent_inode_old,
                name_old,
                parent_inode_new,
                name_new,
                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
            )

    async def link(self, inode, new_parent_inode, new_name, ctx):
        with errnos("link"):
            return entry(self.core.link(inode, new_parent_inode, new_name))

    async def open(self, inode, flags, ctx):
        with errnos("open"):
            fh, keep_cache = await self.core.open(inode, flags)
            return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=_write_only(flags))

    async def create(self, parent_inode, name, mode, flags, ctx):
        with errnos("create"):
            fh, attrs = self.core.create(
                parent_inode, name, _mode(mode, ctx), flags, ctx.uid, ctx.gid
            )
            info = pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=_write_only(flags))
            return info, entry(attrs)

    async def read(self, fh, off, size):
        with errnos("read"):
            return await self.core.read(fh, off, size)

    async def write(self, fh, off, buf):
        with errnos("write"):
            return await self.core.write(fh, off, buf)

    async def flush(self, fh):
        with errnos("flush"):
            self.core.flush(fh)

    async def fsync(self, fh, datasync):
        with errnos("fsync"):
            self.core.fsync(fh)

    async def release(self, fh):
        with errnos("release"):
            self.core.release(fh)

    async def opendir(self, inode, ctx):
        with errnos("opendir"):
            return self.core.opendir(inode)

    async def readdir(self, fh, start_id, token):
        with errnos("readdir"):
            self.core.readdir(fh, start_id, functools.partial(pyfuse3.readdir_reply, token))

    async def releasedir(self, fh):
        with errnos("releasedir"):
            self.core.releasedir(fh)

    async def fsyncdir(self, fh, datasync):
        return None  # namespace changes are durable when they return

    async def statfs(self, ctx):
        with errnos("statfs"):
            s = self.core.statfs()
            out = pyfuse3.StatvfsData()
            out.f_bsize = out.f_frsize = s.bsize
            out.f_blocks, out.f_bfree, out.f_bavail = s.blocks, s.bfree, s.bavail
            out.f_files, out.f_ffree, out.f_favail = s.files, s.ffree, s.ffree
            out.f_namemax = s.namemax
            return out

    async def getxattr(self, inode, name, ctx):
        with errnos("getxattr"):
            return self.core.getxattr(inode, name)

    async def setxattr(self, inode, name, value, ctx):
        with errnos("setxattr"):
            self.core.setxattr(inode, name, value)

    async def listxattr(self, inode, ctx) -> Sequence[bytes]:
        with errnos("listxattr"):
            return self.core.listxattr(inode)

    async def removexattr(self, inode, name, ctx):
        with errnos("removexattr"):
            self.core.removexattr(inode, name)

    async def access(self, inode, mode, ctx):
        # mounted with default_permissions, so the kernel checks modes itself and
        # never asks; answer for existence only if it does
        with errnos("access"):
            self.core.getattr(inode)
            return True
