#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "CSystem.h"

int CSystem_pipeClosedOnExec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int CSystem_nameThisThread(const char *name) {
    return pthread_setname_np(pthread_self(), name);
}

int CSystem_memoryFile(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}

int CSystem_startWriteBack(int fd, long long offset, long long count) {
    return sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE);
}

int CSystem_allocateKeepingSize(int fd, long long offset, long long count) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, count);
}

int CSystem_freeKeepingSize(int fd, long long offset, long long count) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count);
}

// Linux 6.5's cachestat(2), which glibc 2.36 and its kernel headers do not name yet.
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct CSystem_cachestatRange { uint64_t offset, length; };
struct CSystem_cachestat { uint64_t cached, dirty, writeback, evicted, recentlyEvicted; };

long long CSystem_cachedPages(int fd, long long offset, long long length) {
    struct CSystem_cachestatRange range = { (uint64_t)offset, (uint64_t)length };
    struct CSystem_cachestat found;
    if (syscall(__NR_cachestat, fd, &range, &found, 0) != 0) return -1;
    return (long long)found.cached;
}

const int CSystem_F_OFD_SETLK = F_OFD_SETLK;
const int CSystem_POSIX_SPAWN_SETSID = POSIX_SPAWN_SETSID;
const int CSystem_O_DIRECT = O_DIRECT;
