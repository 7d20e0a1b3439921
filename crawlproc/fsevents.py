"""Where file events cannot be had: file systems that send none, and inotify's limits.

watch.Watcher asks `no_events_filesystem` before it starts an observer, and
words a refused inotify watch or instance with `refused`; either way it polls.
"""

from __future__ import annotations

import errno
import os

# File systems whose changes made elsewhere (another client, another node) reach no inotify
# watch here: mount types as /proc/self/mountinfo names them ("fuse.sshfs" counts as sshfs).
# A local FUSE file system (fuse-overlayfs...) does send events: only network ones are named.
NO_EVENT_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "cephfs", "glusterfs", "gpfs", "beegfs",
    "9p", "afs", "ocfs2", "gfs2", "vboxsf", "virtiofs", "sshfs", "s3fs", "rclone", "gcsfuse",
})
MOUNTINFO = "/proc/self/mountinfo"


def no_events_filesystem(path: bytes, mountinfo: str = MOUNTINFO) -> str | None:
    """Why inotify would miss changes under `path`, or None: the file system of `path`, or of a
    mount inside it, sends no events for changes made elsewhere (NFS, SMB, Lustre, FUSE...)."""
    try:
        with open(mountinfo, "rb") as f:
            mounts = [_mount_of(line) for line in f]
    except OSError:
        return None
    real = os.path.realpath(path)
    holding = max((m for m in mounts if m and _is_under(real, m[0])), key=lambda m: len(m[0]), default=None)
    inside = [m for m in mounts if m and m[0] != real and _is_under(m[0], real)]
    for point, fstype in ([holding] if holding else []) + inside:
        if fstype in NO_EVENT_FILESYSTEMS or fstype.removeprefix("fuse.") in NO_EVENT_FILESYSTEMS:
            where = f"{os.fsdecode(path)}" if holding and point == holding[0] else \
                f"{os.fsdecode(point)} inside {os.fsdecode(path)}"
            return f"{where} is on {fstype}, which sends no file events for changes made elsewhere"
    return None


def _mount_of(line: bytes) -> tuple[bytes, str] | None:
    """(mount point, file system type) of one /proc/self/mountinfo line."""
    fields = line.split()
    try:
        separator = fields.index(b"-")
        point, fstype = fields[4], fields[separator + 1]
    except (ValueError, IndexError):
        return None
    # Spaces and the like are octal escapes there (\040).
    return point.decode("unicode_escape").encode("latin-1"), fstype.decode("ascii", "replace")


def _is_under(path: bytes, folder: bytes) -> bool:
    return path == folder or path.startswith(folder.rstrip(b"/") + b"/")


def refused(error: int) -> str:
    """The kernel refused an inotify watch (ENOSPC) or instance (EMFILE): which limit, and the
    command that doubles it."""
    what = "instances" if error == errno.EMFILE else "watches"
    setting = f"fs.inotify.max_user_{what}"
    try:
        with open(f"/proc/sys/{setting.replace('.', '/')}", encoding="ascii") as f:
            raise_it = f"; sysctl -w {setting}={2 * int(f.read())} raises it"
    except (OSError, ValueError):
        raise_it = ""
    return f"the kernel refuses more inotify {what} ({setting} reached{raise_it})"
