"""The output folder: what the trainer owns in it, and who is using it.

A folder the trainer writes to holds a manifest, ``.fusedlora-run.json``, naming every folder it made there
(checkpoints, the built-in base model). It only ever removes folders the manifest names (and their
``.tmp-`` twins), so files a user keeps beside a run, or another tool's ``checkpoint-*`` folders, are never
touched. A folder that is not empty and has no manifest is refused as a whole.

While a run writes, it holds an exclusive ``flock`` on ``.fusedlora-run.lock`` (pid inside): a second
trainer on the same folder is refused with the holder's pid. The kernel drops the lock when the process
ends, however it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

MANIFEST = ".fusedlora-run.json"
LOCK = ".fusedlora-run.lock"
OWNER = "fusedlora train"
WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_modes(folder: str) -> None:
    """Files as the user's umask makes them (mkstemp and some writers, safetensors among them, give 0600)."""
    mode = 0o666 & ~umask()
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), mode)


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, replaced in one rename (a kill leaves the old file or the new one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out: str) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--out: {path} is unreadable ({exc}); the folder was left as it is") from None
    if not isinstance(doc, dict) or doc.get("owner") != OWNER or not isinstance(doc.get("folders"), list):
        raise ValueError(f"--out: {path} is not a fusedlora train manifest; the folder was left as it is")
    return doc


def owned(out: str) -> set[str]:
    """Names of the folders the trainer made in ``out``."""
    doc = read_manifest(out)
    return set(doc["folders"]) if doc else set()


def own(out: str, name: str) -> None:
    """Record ``name`` as the trainer's, before it is created."""
    doc = read_manifest(out) or {"owner": OWNER, "folders": []}
    if name not in doc["folders"]:
        doc["folders"].append(name)
        write_json(os.path.join(out, MANIFEST), doc)


def disown(out: str, name: str) -> None:
    """Forget ``name`` once it is removed."""
    doc = read_manifest(out)
    if doc and name in doc["folders"]:
        doc["folders"].remove(name)
        write_json(os.path.join(out, MANIFEST), doc)


def check(out: str) -> None:
    """Before anything loads: ``out`` can become this run's folder. Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out: {out} is a file, not a folder")
    if os.path.isdir(out):
        if set(os.listdir(out)) - {LOCK} and read_manifest(out) is None:
            raise FileExistsError(f"--out: {out} is not empty and was not made by {OWNER} (no {MANIFEST} in it); "
                                  "nothing in it was touched: choose a new or empty folder")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out: cannot create {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied", parent)


class Lock:
    """The exclusive hold on an output folder; ``release`` (or the process's end) lets it go."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise FileExistsError(f"--out: {out} is in use by another {OWNER} (pid {holder}); wait for it to end "
                                  "or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim(out: str) -> Lock:
    """Make ``out`` this run's folder (created with the user's umask, manifest written) and lock it."""
    check(out)
    os.makedirs(out, exist_ok=True)
    lock = Lock(out)
    try:
        check(out)  # another trainer may have written into it between the first check and the lock
        if read_manifest(out) is None:
            write_json(os.path.join(out, MANIFEST), {"owner": OWNER, "folders": []})
    except BaseException:
        lock.release()
        raise
    return lock
