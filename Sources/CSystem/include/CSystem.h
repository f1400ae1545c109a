#ifndef OCICACHEFS_CSYSTEM_H
#define OCICACHEFS_CSYSTEM_H
// What Swift's Glibc module leaves out: it is built without _GNU_SOURCE, so glibc's GNU
// extensions and Linux's own constants are invisible to Swift. CSystem.c is compiled with
// _GNU_SOURCE and hands them over from the headers themselves. SystemSupport is its one
// Swift owner.

/// A pipe whose two ends are close-on-exec from the start: no child spawned by another thread
/// meanwhile can inherit one.
int CSystem_pipeClosedOnExec(int fds[2]);

/// Names the calling thread (at most 15 bytes are kept) for top -H, perf and gdb.
int CSystem_nameThisThread(const char *name);

/// An anonymous file in memory, close-on-exec: its pages exist only while a descriptor is
/// open and count as the process's memory.
int CSystem_memoryFile(const char *name);

/// Starts writing a file range's dirty pages to disk, without waiting (sync_file_range with
/// SYNC_FILE_RANGE_WRITE).
int CSystem_startWriteBack(int fd, long long offset, long long count);

/// Allocates a file range's disk blocks without changing its size (fallocate with
/// FALLOC_FL_KEEP_SIZE).
int CSystem_allocateKeepingSize(int fd, long long offset, long long count);

/// Frees a file range's disk blocks without changing its size: the range reads as zeros
/// (fallocate with FALLOC_FL_PUNCH_HOLE).
int CSystem_freeKeepingSize(int fd, long long offset, long long count);

/// How many pages of a file's range the kernel's page cache holds (cachestat, Linux 6.5);
/// -1 with errno set on failure.
long long CSystem_cachedPages(int fd, long long offset, long long length);

/// F_OFD_SETLK: a record lock owned by the open file description, not the process.
extern const int CSystem_F_OFD_SETLK;
/// POSIX_SPAWN_SETSID: the child starts a new session.
extern const int CSystem_POSIX_SPAWN_SETSID;
/// O_DIRECT: reads and writes bypass the page cache.
extern const int CSystem_O_DIRECT;
#endif
