internal import CSystem

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Threads without Foundation's `Thread`, which would link corelibs Foundation and its ICU data
/// into the binary.
public enum SystemThread {
    private final class Start {
        let name: String
        let body: @Sendable () -> Void
        init(name: String, body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Runs `body` on a new detached thread. `name` shows in `top -H` and perf (15 bytes kept).
    public static func start(named name: String, _ body: @escaping @Sendable () -> Void) {
        // SAFETY: the retained box is released exactly once, by the new thread (or below when
        // no thread was created).
        let start = Unmanaged.passRetained(Start(name: name, body: body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            // SAFETY: `argument` is the box passed to pthread_create, retained once for us.
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            _ = CSystem_nameThisThread(String(decoding: start.name.utf8.prefix(15), as: UTF8.self))
            start.body()
            return nil
        }, start)
        guard result == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            fatalError("cannot start a thread: \(String(cString: strerror(result)))")
        }
        pthread_detach(thread)
    }

    /// Blocks the calling thread for `duration`, resuming after interrupting signals.
    public static func sleep(for duration: Duration) {
        let (seconds, attoseconds) = duration.components
        guard seconds > 0 || attoseconds > 0 else { return }
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}

extension SystemThread {
    /// Names the calling thread. Called on the main thread it names the process, as `ps`,
    /// `pgrep` and `top` show it (15 bytes are kept).
    public static func nameCurrentThread(_ name: String) {
        _ = CSystem_nameThisThread(String(decoding: name.utf8.prefix(15), as: UTF8.self))
    }
}
