#ifndef OCICACHEFS_CSYSTEM_SHIM_H
#define OCICACHEFS_CSYSTEM_SHIM_H
#include <fcntl.h>
#include <pthread.h>
// GNU extensions of glibc that Swift's Glibc module leaves out (it is built without
// _GNU_SOURCE); declared here as glibc's manual gives them.
int pipe2(int pipefd[2], int flags);
int pthread_setname_np(pthread_t thread, const char *name);
int memfd_create(const char *name, unsigned int flags);

/// A pipe whose two ends are close-on-exec from the start: no child spawned by another thread
/// meanwhile can inherit one.
static inline int CSystem_pipeClosedOnExec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

/// Names the calling thread (at most 15 bytes are kept) for top -H, perf and gdb.
static inline int CSystem_nameThisThread(const char *name) {
    return pthread_setname_np(pthread_self(), name);
}
/// An anonymous file in memory, close-on-exec (MFD_CLOEXEC is 1 in <linux/memfd.h>): its
/// pages exist only while a descriptor is open and count as the process's memory.
static inline int CSystem_memoryFile(const char *name) {
    return memfd_create(name, 1U);
}
#endif
