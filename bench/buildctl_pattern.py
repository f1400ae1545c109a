#!/usr/bin/env python3
"""Read a file the way buildctl's local cache importer does: for every 1 MiB chunk
stat, stat, open, pread(1 MiB), close. Prints the number of bytes read and the seconds the
loop took (interpreter start-up excluded).

usage: buildctl_pattern.py FILE [CHUNK_BYTES]
"""
import os
import sys
import time


def main():
    path = sys.argv[1]
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    buf = bytearray(chunk)
    start = time.perf_counter()
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
            sys.exit(f"buildctl_pattern.py: short read at {offset}: {n} bytes")
        total += n
    print(total, time.perf_counter() - start)


if __name__ == "__main__":
    main()
