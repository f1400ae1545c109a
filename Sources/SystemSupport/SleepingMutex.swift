#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A lock for critical sections that last long (a system call copying tens of kilobytes), whose
/// waiters sleep in the kernel and whose holder is free to take it again at once.
///
/// Neither alternative suits a long section on a machine with few cores. `Synchronization.Mutex`
/// uses a priority-inheritance futex, which hands the lock to a sleeping waiter on every unlock:
/// guarding the cache file's writes with it slowed a cold 1 GiB read from 1.6 s to 3.4 s. And
/// leaving the writes to the kernel's own per-file lock (ext4 takes the inode's rwsem for every
/// buffered write) makes waiters spin while the holder copies: about 10% of the CPU of a cold
/// 4 GiB read on 2 cores. glibc's default pthread mutex neither spins nor hands off.
public final class SleepingMutex: @unchecked Sendable {
    // SAFETY: pthread_mutex_lock/unlock serialize all access; the mutex never moves (it lives
    // in its own allocation) and is destroyed only in deinit, when no thread can hold it.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}
