"""The pure parts of file serving: ranges, validators and conditions, path checks."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from exporter.errors import ApiError
from exporter.files import conditions, ranges
from exporter.files.demo import parse_size
from exporter.files.paths import FilesRoot, NotCached
from exporter.files.ranges import ByteRange

SIZE = 1000


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", [(0, 99)]),
    ("bytes=900-", [(900, 999)]),
    ("bytes=-100", [(900, 999)]),
    ("bytes=-5000", [(0, 999)]),
    ("bytes=990-5000", [(990, 999)]),
    ("BYTES = 0-0", [(0, 0)]),
    ("bytes=0-99,200-299", [(0, 99), (200, 299)]),
    ("bytes=200-299,0-99", [(0, 99), (200, 299)]),
    ("bytes=0-99,50-149", [(0, 149)]),  # overlapping: merged
    ("bytes=0-99,100-199", [(0, 199)]),  # touching: merged
    ("bytes=0-99, ,2000-3000", [(0, 99)]),  # an unsatisfiable one dropped
    ("bytes=0-1,3-4,6-7,9-10,12-13,15-16,18-19,21-22,24-25,27-28,30-31,33-34,36-37,39-40,"
     "42-43,45-46", [(i, i + 1) for i in range(0, 46, 3)]),  # 16: at the cap
])
def test_ranges(header: str, expected: list[tuple[int, int]]) -> None:
    assert ranges.parse_range(header, SIZE, 16) == [ByteRange(a, b) for a, b in expected]


@pytest.mark.parametrize("header", [
    "bytes=5-2", "bytes=abc", "bytes=", "bytes=1-2-3", "items=0-5", "bytes 0-5", "bytes=--5",
    "bytes=0x10-20", "bytes=+1-2", ",".join(["bytes=0-0"] + ["2-2"] * 16), "bytes=1.5-2",
    "",
])
def test_ignored_ranges(header: str) -> None:
    assert ranges.parse_range(header, SIZE, 16) is None


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=1000-", SIZE), ("bytes=1000-2000,3000-", SIZE), ("bytes=-0", SIZE),
    ("bytes=0-", 0), ("bytes=-10", 0),
])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse_range(header, size, 16)


def test_multipart_layout_length_matches_body() -> None:
    layout = ranges.partial([ByteRange(0, 9), ByteRange(20, 29)], SIZE, "text/plain")
    literal = sum(len(p.literal) for p in layout.parts)
    assert layout.length == literal + 20
    assert layout.content_type.startswith("multipart/byteranges; boundary=")


def validators() -> conditions.Validators:
    return conditions.Validators('"abc"', "Sun, 06 Nov 1994 08:49:37 GMT", 784111777)


OLDER, SAME, NEWER = ("Sat, 05 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 GMT",
                      "Mon, 07 Nov 1994 08:49:37 GMT")


@pytest.mark.parametrize(("headers", "method", "expected"), [
    ({}, "GET", None),
    ({"if-none-match": '"abc"'}, "GET", 304),
    ({"if-none-match": 'W/"abc"'}, "GET", 304),  # weak comparison
    ({"if-none-match": '"x", "abc"'}, "HEAD", 304),
    ({"if-none-match": "*"}, "GET", 304),
    ({"if-none-match": '"x"'}, "GET", None),
    ({"if-modified-since": SAME}, "GET", 304),
    ({"if-modified-since": NEWER}, "GET", 304),
    ({"if-modified-since": OLDER}, "GET", None),
    ({"if-modified-since": "garbage"}, "GET", None),
    # If-None-Match wins over If-Modified-Since (§13.2.2 step 3 before 4)
    ({"if-none-match": '"x"', "if-modified-since": NEWER}, "GET", None),
    ({"if-match": '"abc"'}, "GET", None),
    ({"if-match": "*"}, "GET", None),
    ({"if-match": 'W/"abc"'}, "GET", 412),  # strong comparison
    ({"if-match": '"x"'}, "GET", 412),
    ({"if-unmodified-since": OLDER}, "GET", 412),
    ({"if-unmodified-since": SAME}, "GET", None),
    # If-Match wins over If-Unmodified-Since, and 412 over 304
    ({"if-match": '"abc"', "if-unmodified-since": OLDER}, "GET", None),
    ({"if-match": '"x"', "if-none-match": '"abc"'}, "GET", 412),
])
def test_conditions(headers: dict[str, str], method: str, expected: int | None) -> None:
    assert conditions.evaluate(method, headers, validators()) == expected


@pytest.mark.parametrize(("value", "allowed"), [
    (None, True), ('"abc"', True), ('W/"abc"', False), ('"x"', False),
    (SAME, True), (NEWER, False), (OLDER, False), ("nonsense", False),
])
def test_if_range(value: str | None, allowed: bool) -> None:
    assert conditions.if_range_allows(value, validators()) is allowed


def test_etag_changes_with_content_identity(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"one")
    first = conditions.Validators.of(f.stat()).etag
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    assert conditions.Validators.of(f.stat()).etag != first
    assert first.startswith('"') and not first.startswith("W/")


@pytest.mark.parametrize(("path", "status"), [
    ("../x", 404), ("a/../../x", 404), ("/etc/passwd", 404), ("a//b", 404), (".", 404),
    (".env", 404), ("a\\b", 400), ("a\x00b", 400), ("x" * 256, 400), ("a/" * 2100, 400),
    ("missing", 404), ("a\nb", 400),
])
def test_bad_paths(tmp_path: Path, path: str, status: int) -> None:
    with pytest.raises(ApiError) as raised:
        FilesRoot(tmp_path).resolve(path)
    assert raised.value.status == status


def test_a_root_that_is_a_link_is_followed_anew_on_each_request(tmp_path: Path) -> None:
    """An operator switches the root's link to a new release: the next request reads the
    new one. An absolute link inside names the root by its real path, and is followed."""
    for release in ("v1", "v2"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "data.txt").write_text(release)
        (tmp_path / release / "by-root.txt").symlink_to(tmp_path / release / "data.txt")
    link = tmp_path / "current"
    link.symlink_to("v1")
    root = FilesRoot(link)

    def read(path: str) -> bytes:
        target = root.open(path)
        try:
            return os.pread(target.fd, 10, 0)
        finally:
            target.close()

    assert read("data.txt") == read("by-root.txt") == b"v1"
    (tmp_path / "next").symlink_to("v2")
    (tmp_path / "next").replace(link)
    root = FilesRoot(link)
    assert read("data.txt") == read("by-root.txt") == b"v2"
    assert root.real(root.resolve("data.txt")) == tmp_path / "v2" / "data.txt"


def test_a_walk_on_the_event_loop_finds_what_the_threads_find_or_steps_aside(
        tmp_path: Path) -> None:
    """`cached=True` (files/visible.py, on the event loop): the same target as the walk in
    a thread where the kernel's caches hold the path, NotCached where a step would wait
    (a name looked up for the first time, a link's text), and the same refusals."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "link.bin").symlink_to("data.bin")
    root = FilesRoot(tmp_path)
    for path in ("sub/data.bin", "sub", "sub/"):
        plain = root.open(path)
        plain.close()  # looked up once: now in the caches
        cached = root.open(path, cached=True)
        try:
            assert (cached.relative, cached.real_relative, cached.is_dir) == (
                plain.relative, plain.real_relative, plain.is_dir)
            assert (cached.stat.st_ino, cached.stat.st_size) == (
                plain.stat.st_ino, plain.stat.st_size)
            if not cached.is_dir:
                assert os.pread(cached.fd, 4, 2) == b"2345"
        finally:
            cached.close()
    unopened = root.open("sub/data.bin", cached=True, open_file=False)
    assert unopened.fd == -1 and unopened.stat.st_size == 10
    with pytest.raises(NotCached):
        root.open(f"sub/never-{os.urandom(4).hex()}.bin", cached=True)
    with pytest.raises(NotCached):
        root.open("sub/link.bin", cached=True)  # the thread's walk follows it
    for path, status in (("../x", 404), (".env", 404), ("a\\b", 400), ("sub/data.bin/", 404)):
        with pytest.raises(ApiError) as raised:
            root.open(path, cached=True)
        assert raised.value.status == status, path
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with contextlib.suppress(NotCached):
            root.open("sub/link.bin", cached=True)
        root.open("sub/data.bin", cached=True).close()
    assert len(os.listdir("/proc/self/fd")) == before  # no descriptor left behind


def test_sizes() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("123") == 123
