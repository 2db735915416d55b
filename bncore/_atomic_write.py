"""Files written whole or not at all: a temporary file next to the destination,
fsync, rename over it, fsync of the directory. A crash, a full disk or a file
size limit midway leaves the old file as it was (optimizer checkpoints, the
CLI's --json reports)."""
from __future__ import annotations

import json
import math
import os
import secrets
import stat
import sys
from typing import Any


def _create_temporary(directory: str, suffix: str):
    """A new file next to the destination, opened exclusively. Unlike
    tempfile.mkstemp's 0600 it gets the permissions of any new file (0666
    less the umask), as the file written directly would; write_bytes gives
    it an existing destination's permissions instead."""
    while True:
        tmp = os.path.join(directory, f".bncore-{secrets.token_hex(8)}{suffix}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _own_stream(path: str):
    """sys.stdout or sys.stderr where `path` opens the same file as its
    descriptor (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N), else None."""
    try:
        st = os.stat(path)            # follows /dev/stdout -> /proc/self/fd/1 -> the file
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            same = os.path.samestat(st, os.fstat(fd))
        except (AttributeError, OSError, ValueError):
            continue
        if same and (not stat.S_ISREG(st.st_mode) or _names_descriptor(path, fd)):
            return stream if hasattr(stream, "buffer") else None
    return None


def _names_descriptor(path: str, fd: int) -> bool:
    """Whether `path` is a name of descriptor `fd` itself rather than of the file
    behind it (a regular file redirected to stdout is also reachable by its own
    name, which must be replaced atomically as any file)."""
    names = {f"/dev/fd/{fd}", f"/proc/self/fd/{fd}", f"/proc/{os.getpid()}/fd/{fd}"}
    names.add({1: "/dev/stdout", 2: "/dev/stderr"}.get(fd, ""))
    return os.path.abspath(path) in names


def write_bytes(path: str, data: bytes, suffix: str = "") -> None:
    """Replace `path` by `data` atomically. A symlink is followed (the file it
    points to is replaced, the link stays); a destination that is not a
    regular file (/dev/stdout, a pipe) is written directly, as rename would
    replace the device itself. A path naming this process's own stdout or
    stderr (/dev/stdout, /dev/fd/1, ...) is written through that stream, also
    where it was redirected to a regular file: replacing the file would lose
    what the process prints after it (review: `--json /dev/stdout` into a pipe
    failed, after the whole run, and into a file lost the table)."""
    path = os.fspath(path)
    stream = _own_stream(path)
    if stream is not None:
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()
        return
    path = os.path.realpath(path)
    try:
        old_mode = os.stat(path).st_mode
    except FileNotFoundError:
        old_mode = None
    special = old_mode is not None and not stat.S_ISREG(old_mode)
    if special:
        with open(path, "wb") as fh:
            fh.write(data)
        return
    directory = os.path.dirname(path)
    fd, tmp = _create_temporary(directory, suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            if old_mode is not None and hasattr(os, "fchmod"):
                # replacing a file keeps its permissions, as writing into it
                # would (a 0600 checkpoint must not come back world-readable)
                os.fchmod(fh.fileno(), stat.S_IMODE(old_mode))
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:                      # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _strict_json(obj: Any) -> Any:
    """obj with every non-finite float as None: JSON has no NaN or Infinity, and
    Python's json writes them as tokens a strict parser refuses."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON, written atomically (see write_bytes); NaN and
    infinities are written as null (strict JSON)."""
    text = json.dumps(_strict_json(obj), indent=1, allow_nan=False)
    write_bytes(path, (text + "\n").encode(), ".json")


def write_json_or_say(command: str, path: str, obj: Any) -> int:
    """write_json for the command line: on failure say why (as a usage error of
    `bncore COMMAND`) and return 2, else 0. A report that cannot be written is
    the caller's error, not a failed check."""
    try:
        write_json(path, obj)
    except OSError as exc:
        print(f"bncore {command}: cannot write --json {path}: {exc}", file=sys.stderr)
        return 2
    return 0
