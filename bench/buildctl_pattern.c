/* Reads a file the way buildctl's local cache importer does: for every 1 MiB chunk stat, stat,
 * open, pread(1 MiB), close, into one page-aligned buffer. Compiled, as buildctl is: the Python
 * replay (buildctl_pattern.py) spends as long in its interpreter per chunk as the filesystem
 * does, which hides what the mount costs. Prints the bytes read and the seconds the loop took.
 *
 * usage: buildctl_pattern FILE [CHUNK_BYTES]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void fail(const char *what, const char *path) {
    fprintf(stderr, "buildctl_pattern: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: buildctl_pattern FILE [CHUNK_BYTES]\n");
        return 2;
    }
    const char *path = argv[1];
    size_t chunk = argc > 2 ? strtoull(argv[2], NULL, 10) : 1 << 20;
    void *buf = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) fail("mmap", "");
    double start = now();
    struct stat st;
    if (stat(path, &st) != 0) fail("stat", path);
    long long total = 0;
    for (off_t offset = 0; offset < st.st_size; offset += chunk) {
        struct stat again;
        if (stat(path, &again) != 0 || stat(path, &again) != 0) fail("stat", path);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail("open", path);
        size_t want = (size_t)(st.st_size - offset) < chunk ? (size_t)(st.st_size - offset) : chunk;
        ssize_t n = pread(fd, buf, chunk, offset);
        if (n < 0) fail("pread", path);
        close(fd);
        if ((size_t)n != want) {
            fprintf(stderr, "buildctl_pattern: short read of %s at %lld: %zd bytes\n", path, (long long)offset, n);
            return 1;
        }
        total += n;
    }
    printf("%lld %.6f\n", total, now() - start);
    return 0;
}
