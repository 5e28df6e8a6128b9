"""Content hashing: code without decorators, helpers it calls, files and folders."""

from __future__ import annotations

from pathlib import Path

from jupyter_mlcloud.pipelines import cache


def helper(x: int) -> int:
    return x + 1


def uses_helper(x: int) -> int:
    return helper(x)


def test_code_hash_leaves_decorators_out_and_follows_helpers() -> None:
    namespace: dict[str, object] = {}
    exec(compile("def f(x):\n    return x\n", "<a>", "exec"), namespace)
    plain = cache.code_hash(uses_helper)
    assert cache.code_hash(uses_helper) == plain
    global helper
    original = helper

    def helper(x: int) -> int:  # a changed helper changes the key of what calls it
        return x + 2

    try:
        assert cache.code_hash(uses_helper) != plain
    finally:
        helper = original
    assert cache.code_hash(namespace["f"]) == cache.code_hash(namespace["f"])  # no source


def test_digests_follow_content_not_time(tmp_path: Path) -> None:
    folder = tmp_path / "model.d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"aaa")
    (folder / "sub" / "b.bin").write_bytes(b"bbb")
    first = cache.digest(str(folder))
    (folder / "a.bin").write_bytes(b"aaa")  # touched, same bytes
    assert cache.digest(str(folder)) == first
    (folder / "sub" / "b.bin").write_bytes(b"bbc")
    assert cache.digest(str(folder)) != first
    assert cache.digest(str(tmp_path / "absent")) is None
    assert cache.value_digest(0.5) == cache.value_digest(0.5) != cache.value_digest(0.25)
    assert cache.digest("memory://nothing/here") is None
