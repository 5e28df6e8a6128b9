"""Content hashing: what a step's cache key is made of.

A step's key is the hash of its code (the function's source, decorators left out), its params
and the content of every input it reads. A local file's digest is the SHA-256 of its bytes, a
folder's that of its files' relative names and digests; a remote (fsspec) object's comes from
what its store says of it (ETag, checksum, size and time), since reading it whole to hash it
would cost what the step costs. Digests of local files are remembered by size and mtime, so
an unchanged rerun reads nothing twice in one process.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

CHUNK = 1 << 20
_memo: dict[tuple[str, Any], str] = {}  # (path, stamp) -> digest


def code_hash(fn: Callable[..., Any], _seen: set[int] | None = None) -> str:
    """The hash of ``fn``'s code: its source without decorators or comments (a param changed
    in ``@pipe.step(params=...)`` counts as a param change, not a code change), and that of
    the functions of its own module it calls by name (a changed helper reruns the step).
    Bytecode and constants stand in where there is no source."""
    seen = _seen if _seen is not None else set()
    seen.add(id(fn))
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        try:
            node = ast.parse(source).body[0]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.decorator_list = []
            text = ast.unparse(node)
        except (SyntaxError, IndexError):  # a lambda inside a longer expression
            text = source
    except (OSError, TypeError):  # made by exec without a file: no source to read
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
    parts = [text]
    code = getattr(fn, "__code__", None)
    scope = getattr(fn, "__globals__", {})
    for name in sorted(set(code.co_names) if code is not None else ()):
        helper = scope.get(name)
        if (inspect.isfunction(helper) and id(helper) not in seen
                and helper.__module__ == getattr(fn, "__module__", None)):
            parts.append(name + ":" + code_hash(helper, seen))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def text_hash(value: Any) -> str:
    """The hash of a JSON value, independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def stamp(location: str) -> Any:
    """What changes when a local file or folder changes (sizes and times); None if absent."""
    path = local_path(location)
    if os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        found = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                found.append([os.path.relpath(os.path.join(folder, name), path), st.st_size,
                              st.st_mtime_ns])
        return found
    return None


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(location: str) -> str | None:
    """The content digest of a file, folder or fsspec URL; None if there is nothing there."""
    if is_url(location):
        return _remote_digest(location)
    path = local_path(location)
    now = stamp(path)
    if now is None:
        return None
    key = (os.path.abspath(path), json.dumps(now))
    if key in _memo:
        return _memo[key]
    if os.path.isfile(path):
        value = _file_digest(path)
    else:
        h = hashlib.sha256()
        for relative, _, _ in now:
            h.update(relative.encode() + b"\0")
            h.update(_file_digest(os.path.join(path, relative)).encode())
        value = h.hexdigest()
    _memo[key] = value
    return value


def _remote_digest(url: str) -> str | None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return None
    if fs.isdir(path):
        infos = sorted(fs.find(path, detail=True).items())
        return text_hash([[name, fs.ukey(name)] for name, _ in infos])
    return str(fs.ukey(path))


def value_digest(value: Any) -> str:
    """The digest of a returned output: its JSON text, and the content of the local file or
    folder it names, if it names one (a rewritten file changes the digest)."""
    parts: list[Any] = [value]
    if isinstance(value, str) and not is_url(value) and os.path.exists(local_path(value)):
        parts.append(digest(value))
    return text_hash(parts)


def cache_key(code: str, params: Mapping[str, Any], inputs: Mapping[str, str | None],
              files: Mapping[str, str]) -> str:
    """A step's cache key: its code hash, params, input digests and output locations (a
    step moved to write elsewhere runs again)."""
    return text_hash({"code": code, "params": dict(params), "inputs": dict(inputs),
                      "files": dict(files)})
