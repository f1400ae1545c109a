#ifndef OCICACHEFS_CFUSE3_SHIM_H
#define OCICACHEFS_CFUSE3_SHIM_H

// 3.12 gives the loop-config API (fuse_loop_cfg_*), which Swift can call.
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

// fuse_file_info's flags are bitfields, which Swift cannot set.
static inline void CFuse3_setKeepCache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void CFuse3_setNoFlush(struct fuse_file_info *fi, int on) { fi->noflush = on ? 1 : 0; }
static inline void CFuse3_setDirectIO(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }

// fuse_reply_buf takes const char *; a const void * wrapper avoids casts on the Swift side.
static inline int CFuse3_replyBuffer(fuse_req_t req, const void *buf, size_t size) {
    return fuse_reply_buf(req, (const char *)buf, size);
}

// fuse_session_loop_mt is a macro choosing a versioned symbol.
static inline int CFuse3_loopMultiThreaded(struct fuse_session *se, unsigned int maxThreads) {
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (config == NULL) return -1;
    fuse_loop_cfg_set_max_threads(config, maxThreads);
    // Workers that find nothing to do stay: libfuse otherwise ends all but the idle ones after
    // each burst of reads and starts new ones for the next, each with a new stack and a 1 MiB
    // request buffer (44 thread starts and about 2 MiB more RSS over a 4 GiB read).
    fuse_loop_cfg_set_idle_threads(config, maxThreads);
    int rc = fuse_session_loop_mt(se, config);
    fuse_loop_cfg_destroy(config);
    return rc;
}

// Settings of the connection negotiated in init.
static inline void CFuse3_tuneConnection(struct fuse_conn_info *conn, unsigned maxWrite, unsigned maxBackground) {
    conn->max_write = maxWrite;
    conn->max_background = maxBackground;
    conn->congestion_threshold = maxBackground * 3 / 4;
    // Linux emulates flock() locally unless told otherwise; that is what BuildKit's lock needs.
    conn->want &= ~FUSE_CAP_FLOCK_LOCKS;
    conn->want &= ~FUSE_CAP_POSIX_LOCKS;
}
// Zero-message opens: the kernel offers them in `capable`; the first open answered ENOSYS
// turns them on. Without OPEN an atomic O_TRUNC would reach nobody, so the VFS must send the
// truncation as a setattr.
static inline int CFuse3_skipOpensIfOffered(struct fuse_conn_info *conn) {
    if (!(conn->capable & FUSE_CAP_NO_OPEN_SUPPORT)) return 0;
    conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
    return 1;
}
#endif
