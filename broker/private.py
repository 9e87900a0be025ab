"""Files only their owner can read: directories 0700, files 0600, whatever the umask.

The config directory holds logins, keys, prompts (in the hub's journal and its SQLite write-ahead
log) and logs, so nothing in it may be readable by other users of the machine. Modes are set
where each file is made, never fixed up afterwards: a chmod after the fact leaves a window, and
misses files made by someone else (SQLite's ``-wal``, ``-shm`` and ``-journal``, a log handler's
next file after a rotation).

* :func:`private_dir` makes a directory 0700 and tightens it when it exists looser.
* :func:`tighten_tree` takes group and other access away from everything under a directory
  (what an older version, or another umask, left behind).
* :func:`write_private` replaces a file atomically with a 0600 one.
* :func:`private_database` readies an SQLite file before it is opened: SQLite gives its sidecar
  files the main file's mode (``robust_open`` in its unix VFS), so a main file made 0600 keeps
  every later WAL private. We do not touch the umask: it is per process, and other threads
  (``to_thread``, uvicorn) create files at the same time.
* :class:`PrivateRotatingFileHandler` is the log handler whose every file (the first, and the
  new one after each rotation) is opened 0600.
"""

from __future__ import annotations

import contextlib
import io
import logging.handlers
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600

#: the files SQLite may create beside a database
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Make ``path`` and any missing parents with mode 0700.

    ``tighten`` also takes group and other access away from ``path`` itself when it already
    exists looser (a config directory made by an older version). Existing parents are never
    changed: they are not ours to decide (``~/.config``, or where a user put ``--log-file``).
    """
    missing: list[Path] = []
    level = path
    while not level.exists() and level != level.parent:
        missing.append(level)
        level = level.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it first: check its mode below
            continue
        # mkdir's mode passes through the umask, which may take the owner's bits too.
        os.chmod(directory, DIR_MODE)
    if tighten:
        _tighten(path, DIR_MODE)
    return path


def tighten_tree(root: Path) -> None:
    """Directories 0700 and files 0600 at most, under ``root`` and ``root`` itself; symbolic
    links are neither followed nor changed, and what we do not own is left alone."""
    _tighten(root, DIR_MODE)
    for top, dirs, files in os.walk(root):
        for name in dirs:
            with contextlib.suppress(FileNotFoundError):
                if not os.path.islink(os.path.join(top, name)):
                    _tighten(Path(top, name), DIR_MODE)
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a .tmp renamed, a WAL removed meanwhile
                if not os.path.islink(os.path.join(top, name)):
                    _tighten(Path(top, name), FILE_MODE)


def write_private(path: Path, text: str) -> None:
    """Create or replace a file with mode 0600, atomically, never briefly readable by others."""
    private_dir(path.parent, tighten=False)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, FILE_MODE)  # a .tmp left by a crash keeps its old mode through O_CREAT
        fh.write(text)
    os.replace(tmp, path)


def open_private(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """``os.open`` that leaves the file (if ours) 0600, whether it was just made or already there.

    Exactly 0600: a umask can take the owner's own bits from a new file too.
    """
    fd = os.open(path, flags, FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_database(path: Path) -> Path:
    """Ready ``path`` for ``sqlite3.connect``: its directory made, the file and any sidecars 0600.

    Call it before every connect that may write. A database from an older version (0644, with a
    0644 WAL that SQLite reuses as is) is tightened here too.
    """
    private_dir(path.parent, tighten=False)
    os.close(open_private(path, os.O_RDONLY | os.O_CREAT))
    for suffix in SQLITE_SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        try:
            _tighten(sidecar, FILE_MODE)
        except FileNotFoundError:
            pass
    return path


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log whose files are 0600 (logging's own opens them 0666 minus the umask).

    Rotation renames files, which keeps their mode, and then opens a new one through
    :meth:`_open`, so overriding it covers every file the handler makes.
    """

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # the handler closes it


def _tighten(path: Path, mode: int) -> None:
    """Take away what ``mode`` does not allow, on a file or directory we own."""
    st = os.stat(path)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
