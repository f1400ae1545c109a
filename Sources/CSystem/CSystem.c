#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/mman.h>
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

const int CSystem_F_OFD_SETLK = F_OFD_SETLK;
const int CSystem_POSIX_SPAWN_SETSID = POSIX_SPAWN_SETSID;
const int CSystem_O_DIRECT = O_DIRECT;
