"""Saving optimizer state to .npz, atomically.

``save`` writes to a temporary file in the destination's directory, flushes
and fsyncs it, then renames it over the destination (and fsyncs the
directory): a crash at any moment leaves either the old checkpoint or the new
one, never a torn file. Arrays are stored bit for bit; the structure
(hyperparameters, step counts) travels as JSON inside the archive.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, Dict

import numpy as np

from bncore._atomic_write import write_bytes

__all__ = ["save", "load"]

FORMAT = "bncore-optimizer-v1"


_TAGS = {"__tuple__", "__dict__"}     # one-key dicts that encode a tuple or a dict


def _to_jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_to_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v) and not set(v) & _TAGS:
            return {k: _to_jsonable(x) for k, x in v.items()}
        # keys JSON cannot hold (0, (1, 2)) or that would read as a tag: pairs
        return {"__dict__": [[_key(k), _to_jsonable(x)] for k, x in v.items()]}
    if isinstance(v, np.generic):          # NumPy scalars: bool_, floating, integer
        return v.item()
    if isinstance(v, np.ndarray):          # e.g. betas as an array: a list (or a number)
        return _to_jsonable(v.tolist())
    if hasattr(v, "shape") and hasattr(v, "tolist"):   # a torch tensor, a CuPy array
        return _to_jsonable(v.tolist())
    return v


def _key(k: Any) -> Any:
    """A dict key as JSON holds it: itself (str, number, bool, None), a tagged
    tuple, or else its str() (an Enum), as checkpoints always stored keys."""
    if k is None or isinstance(k, (str, int, float)):
        return k
    if isinstance(k, tuple):
        return {"__tuple__": [_key(x) for x in k]}
    return str(k)


def _from_jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_from_jsonable(x) for x in v["__tuple__"])
        if set(v) == {"__dict__"}:
            return {_from_jsonable(k): _from_jsonable(x) for k, x in v["__dict__"]}
        return {k: _from_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_jsonable(x) for x in v]
    return v


def _pack(state_dict: Dict[str, Any]) -> Dict[str, np.ndarray]:
    arrays: Dict[str, np.ndarray] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for i, s in state_dict["state"].items():
        for name, v in s.items():
            if hasattr(v, "__cuda_array_interface__"):
                v = v.get()                       # device arrays are saved from the host
            if isinstance(v, np.ndarray):
                arrays[f"state/{i}/{name}"] = v
            else:
                scalars.setdefault(str(i), {})[name] = _to_jsonable(v)
    meta = {"format": FORMAT, "optimizer": state_dict["optimizer"],
            "convention": state_dict["convention"],
            "param_groups": _to_jsonable(state_dict["param_groups"]), "scalars": scalars,
            "array_states": sorted({k.split("/")[1] for k in arrays}, key=int)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return arrays


def _unpack(files) -> Dict[str, Any]:
    if "meta" not in files.files:
        raise ValueError("not a bncore optimizer checkpoint (no 'meta' entry)")
    meta = json.loads(bytes(files["meta"]).decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a bncore optimizer checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    state: Dict[int, Dict[str, Any]] = {}
    for key in files.files:
        if key.startswith("state/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = files[key]
    for i, sc in meta["scalars"].items():
        state.setdefault(int(i), {}).update(_from_jsonable(sc))
    return {"optimizer": meta["optimizer"], "convention": meta["convention"],
            "param_groups": _from_jsonable(meta["param_groups"]), "state": state}


def save(optimizer, path: str) -> None:
    """Write ``optimizer.state_dict()`` to ``path`` (.npz), atomically: a
    temporary file next to it, fsync, rename (bncore._atomic_write); a symlink
    is followed, the file it points to replaced."""
    payload = _pack(optimizer.state_dict())
    buf = io.BytesIO()
    np.savez(buf, **payload)
    write_bytes(path, buf.getvalue(), ".npz")


def load(optimizer, path: str):
    """Load a checkpoint written by :func:`save` into ``optimizer``; returns it."""
    path = os.fspath(path)
    try:
        files = np.load(path, allow_pickle=False)
    except ValueError:
        # np.load's answer to a file that is neither .npy nor .npz (it guesses "pickle")
        raise ValueError(f"{path} is not a bncore optimizer checkpoint (not an .npz "
                         f"archive)") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        # (an OSError, such as a missing file, a directory or no permission,
        # propagates as it is: it is not about the file's contents)
        raise ValueError(f"{path} is not a readable bncore optimizer checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(files, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a bncore optimizer checkpoint (a .npy array, "
                         f"not an .npz archive)")
    try:
        with files:
            state_dict = _unpack(files)
    except (zipfile.BadZipFile, EOFError, KeyError, UnicodeDecodeError,
            json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable bncore optimizer checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    optimizer.load_state_dict(state_dict)
    return optimizer
