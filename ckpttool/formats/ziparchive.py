"""torch's zip archive, written directly: what `torch.save` writes, with every I/O error a Python `OSError`.

torch's own writer (`torch._C.PyTorchFileWriter`) aborts the whole process on a full disk: its destructor throws a
`c10::Error` (exit 134, a native stack dump, the staging file left behind). This one writes the layout FORMATS.md
gives (caffe2/serialize/inline_container.cc): stored members named `<prefix>/<record>`, each member's data 64-byte
aligned by an `FB` extra field of padding, a CRC-32 per member, zip64 fields where a size or offset needs them.
Sizes are known before the data, so each local header is written whole and only its CRC is patched afterwards.
"""

from __future__ import annotations

import os
import struct
import zlib

ALIGNMENT = 64
ZIP64_LIMIT = 0xFFFFFFFF
UTF8_NAMES = 0x800
PADDING_ID = b"FB"  # the extra-field id torch's writer pads with


class ArchiveWriter:
    def __init__(self, path: str, prefix: str = "archive"):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as torch.save
        self._prefix = prefix
        self._offset = 0
        self._entries: list[tuple[bytes, int, int, int]] = []  # (name, header offset, size, crc)

    def write_record(self, name: str, data) -> None:
        """A whole member from bytes or any buffer."""
        self.write_stream(name, memoryview(data).nbytes, [data])

    def write_stream(self, name: str, size: int, chunks) -> None:
        """A member of `size` bytes from an iterable of buffers."""
        full, header_offset = self._local_header(name, size)
        crc, written = 0, 0
        for chunk in chunks:
            chunk = memoryview(chunk).cast("B")
            crc = zlib.crc32(chunk, crc)
            self._write(chunk)
            written += len(chunk)
        if written != size:
            raise ValueError(f"member {name}: {written} bytes written, {size} announced")
        self._finish(full, header_offset, size, crc)

    def write_copy(self, name: str, src_path: str, offset: int, length: int) -> None:
        """A member copied from `length` bytes of another file: by the kernel (copy_file_range) where it can, the
        CRC-32 from a read of the source (page cache), never through Python buffers on the way out."""
        from ckpttool.formats.safetensors import copy_range
        from ckpttool.hashing import crc32_range

        crc, done = crc32_range(src_path, offset, length)
        if done != length:
            raise ValueError(f"member {name}: the source holds {done} of its {length} bytes")
        full, header_offset = self._local_header(name, length)
        src = os.open(src_path, os.O_RDONLY)
        try:
            copy_range(src, offset, self._fd, length)
        finally:
            os.close(src)
        self._offset += length
        self._finish(full, header_offset, length, crc)

    def _local_header(self, name: str, size: int) -> tuple[bytes, int]:
        """Write a member's local header (its CRC patched by _finish); (its full name, where it starts)."""
        full = f"{self._prefix}/{name}".encode()
        header_offset = self._offset
        zip64 = size >= ZIP64_LIMIT
        start = header_offset + 30 + len(full) + 4 + (20 if zip64 else 0)
        extra = PADDING_ID + struct.pack("<H", -start % ALIGNMENT) + b"Z" * (-start % ALIGNMENT)
        if zip64:
            extra += struct.pack("<HHQQ", 1, 16, size, size)
        stated = ZIP64_LIMIT if zip64 else size
        self._write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 45 if zip64 else 20, UTF8_NAMES, 0, 0, 0x21,
                                0, stated, stated, len(full), len(extra)) + full + extra)
        return full, header_offset

    def _finish(self, full: bytes, header_offset: int, size: int, crc: int) -> None:
        os.pwrite(self._fd, struct.pack("<L", crc), header_offset + 14)
        self._entries.append((full, header_offset, size, crc))

    def close(self, serialization_id: str) -> None:
        """Write torch's closing records and the central directory, then close the file."""
        self.write_record("version", b"3\n")
        self.write_record(".data/serialization_id", serialization_id.encode())
        directory_offset = self._offset
        for full, header_offset, size, crc in self._entries:
            fields = [v for v in (size, size) if v >= ZIP64_LIMIT] + ([header_offset] if header_offset >= ZIP64_LIMIT
                                                                      else [])
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            self._write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45 if extra else 20, UTF8_NAMES, 0, 0, 0x21,
                                    crc, min(size, ZIP64_LIMIT), min(size, ZIP64_LIMIT), len(full), len(extra),
                                    0, 0, 0, 0, min(header_offset, ZIP64_LIMIT)) + full + extra)
        directory_size = self._offset - directory_offset
        count = len(self._entries)
        if count >= 0xFFFF or directory_offset >= ZIP64_LIMIT or directory_size >= ZIP64_LIMIT:
            end64 = self._offset
            self._write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, directory_size,
                                    directory_offset))
            self._write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1))
        self._write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                min(directory_size, ZIP64_LIMIT), min(directory_offset, ZIP64_LIMIT), 0))
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._offset += len(view)
        while view:  # os.write may write less than asked; a full disk raises OSError here
            view = view[os.write(self._fd, view):]
