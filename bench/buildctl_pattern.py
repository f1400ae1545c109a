#!/usr/bin/env python3
"""Read a file the way buildctl's local cache importer does: for every 1 MiB chunk
stat, stat, open, pread(1 MiB), close. Prints the number of bytes read and the seconds the
loop took (interpreter start-up excluded).

usage: buildctl_pattern.py FILE [CHUNK_BYTES]

Also a module: read_blob(path) is the same loop (used by the CI replay in bench_s3.py).
"""
import os
import sys
import time


def read_blob(path, chunk=1 << 20, buf=None):
    """The per-chunk loop; returns the bytes read. Raises OSError on a short read."""
    buf = buf if buf is not None and len(buf) == chunk else bytearray(chunk)
    size = os.stat(path).st_size
    total = 0
    for offset in range(0, size, chunk):
        os.stat(path)
        os.stat(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            n = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if n != min(chunk, size - offset):
            raise OSError(f"short read of {path} at {offset}: {n} bytes")
        total += n
    return total


def main():
    path = sys.argv[1]
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    start = time.perf_counter()
    try:
        total = read_blob(path, chunk)
    except OSError as e:
        sys.exit(f"buildctl_pattern.py: {e}")
    print(total, time.perf_counter() - start)


if __name__ == "__main__":
    main()
