"""A ZIP archive written front to back, for entries whose size is not known up front.

Each streamed entry is a local header with no sizes, its deflated bytes, then a data
descriptor (general purpose bit 3); the central directory comes last, so an archive cut
anywhere before its end has none, and every reader refuses it. Zip64 the way Excel takes
it (Apache POI's streaming writer, docs/internals.md `exports/renderers/xlsx.py`): a
streamed entry's local header says version 4.5 and has no extra field, its descriptor
holds 8-byte sizes, and the central directory carries a Zip64 extra field only for an
entry or an offset that needs one (and then the Zip64 end records).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from isal import isal_zlib

MAX32 = 0xFFFFFFFF
_VERSION_DEFLATE = 20
_VERSION_ZIP64 = 45
_DESCRIPTOR = 0x08
_DEFLATED = 8
# 1980-01-01 00:00 in DOS format: archives of the same rows are the same bytes whenever
# they are made (a resume splices bytes, and a file's time is the export's anyway).
_DOS_TIME, _DOS_DATE = 0, (1 << 5) | 1
# ISA-L's deflate (its default level): about 4 times zlib's speed at level 1 on sheet XML,
# and a few percent smaller (measured in docs/internals.md, `exports/renderers/xlsx.py`).
LEVEL = 2


@dataclass
class _Entry:
    name: bytes
    offset: int
    crc: int = 0
    compressed: int = 0
    size: int = 0
    streamed: bool = False


class Deflater:
    """One entry's raw deflate stream and its CRC-32, fed in pieces."""

    def __init__(self) -> None:
        self._z = isal_zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        self.crc = 0
        self.size = 0
        self.compressed = 0

    def feed(self, data: bytes) -> bytes:
        self.crc = isal_zlib.crc32(data, self.crc)
        self.size += len(data)
        out = self._z.compress(data)
        self.compressed += len(out)
        return out

    def finish(self) -> bytes:
        out = self._z.flush(zlib.Z_FINISH)
        self.compressed += len(out)
        return out


class ZipWriter:
    """The bytes of an archive, in order: each method returns what comes next."""

    def __init__(self) -> None:
        self.written = 0
        self._entries: list[_Entry] = []
        self._open: _Entry | None = None

    def _out(self, data: bytes) -> bytes:
        self.written += len(data)
        return data

    def whole(self, name: str, data: bytes) -> bytes:
        """A small entry known whole: sizes in its local header, no descriptor."""
        deflater = Deflater()
        body = deflater.feed(data) + deflater.finish()
        entry = _Entry(name.encode(), self.written, deflater.crc, len(body), len(data))
        self._entries.append(entry)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION_DEFLATE, 0, _DEFLATED,
                             _DOS_TIME, _DOS_DATE, entry.crc, entry.compressed, entry.size,
                             len(entry.name), 0)
        return self._out(header + entry.name + body)

    def begin(self, name: str) -> bytes:
        """The local header of an entry whose bytes follow (written through `data`)."""
        assert self._open is None
        entry = _Entry(name.encode(), self.written, streamed=True)
        self._open = entry
        self._entries.append(entry)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION_ZIP64, _DESCRIPTOR,
                             _DEFLATED, _DOS_TIME, _DOS_DATE, 0, 0, 0, len(entry.name), 0)
        return self._out(header + entry.name)

    def data(self, compressed: bytes) -> bytes:
        return self._out(compressed)

    def end(self, deflater: Deflater) -> bytes:
        """The open entry's data descriptor, once its last bytes were written."""
        entry, self._open = self._open, None
        assert entry is not None
        entry.crc, entry.compressed, entry.size = deflater.crc, deflater.compressed, deflater.size
        return self._out(struct.pack("<IIQQ", 0x08074B50, entry.crc, entry.compressed,
                                     entry.size))

    def finish(self) -> bytes:
        """The central directory and its end records."""
        assert self._open is None
        start = self.written
        directory = b"".join(self._directory_entry(e) for e in self._entries)
        size = len(directory)
        count = len(self._entries)
        tail = b""
        if start > MAX32 or start + size > MAX32 or count > 0xFFFF:
            record = start + size
            tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _VERSION_ZIP64, _VERSION_ZIP64,
                               0, 0, count, count, size, start)
            tail += struct.pack("<IIQI", 0x07064B50, 0, record, 1)
        tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF),
                            min(count, 0xFFFF), min(size, MAX32), min(start, MAX32), 0)
        return self._out(directory + tail)

    @staticmethod
    def _directory_entry(e: _Entry) -> bytes:
        extra = b""
        size, compressed, offset = e.size, e.compressed, e.offset
        if size > MAX32:
            extra += struct.pack("<Q", size)
            size = MAX32
        if compressed > MAX32:
            extra += struct.pack("<Q", compressed)
            compressed = MAX32
        if offset > MAX32:
            extra += struct.pack("<Q", offset)
            offset = MAX32
        if extra:
            extra = struct.pack("<HH", 0x0001, len(extra)) + extra
        # As POI's: made by 4.5, needed 4.5 only where Zip64 fields are there to read.
        needed = _VERSION_ZIP64 if extra else _VERSION_DEFLATE
        flags = _DESCRIPTOR if e.streamed else 0
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _VERSION_ZIP64, needed, flags,
                           _DEFLATED, _DOS_TIME, _DOS_DATE, e.crc, compressed, size,
                           len(e.name), len(extra), 0, 0, 0, 0, offset) + e.name + extra
