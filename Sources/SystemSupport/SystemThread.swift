internal import CSystem
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Threads without Foundation's `Thread`, which would link corelibs Foundation and its ICU data
/// into the binary.
/// What a new thread runs, and its name.
private final class SystemThreadStart {
    let name: String
    let body: @Sendable () -> Void
    init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }
}

public enum SystemThread {

    /// Runs `body` on a new detached thread. `name` shows in `top -H` and perf (15 bytes kept).
    public static func start(named name: String, _ body: @escaping @Sendable () -> Void) {
        // SAFETY: the retained box is released exactly once, by the new thread (or below when
        // no thread was created).
        pthread_detach(JoinableThread(named: name, body).thread)
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

extension SystemThread {
    /// `transform` of every item, in the items' order, computed on up to `width` threads at once
    /// (the calling thread waits). For blocking work, such as requests a server answers in
    /// parallel.
    public static func map<Item: Sendable, Result: Sendable>(
        _ items: [Item], width: Int, named name: String, _ transform: @escaping @Sendable (Item) -> Result
    ) -> [Result] {
        guard items.count > 1, width > 1 else { return items.map(transform) }
        let results = Mutex<[Result?]>(Array(repeating: nil, count: items.count))
        let next = Atomic<Int>(0)
        let work: @Sendable () -> Void = {
            while true {
                let index = next.add(1, ordering: .relaxed).oldValue
                guard index < items.count else { return }
                let result = transform(items[index])
                results.withLock { $0[index] = result }
            }
        }
        let threads = (1..<min(width, items.count)).map { _ in JoinableThread(named: name, work) }
        work()
        threads.forEach { $0.join() }
        return results.withLock { $0.map { $0! } }
    }
}

/// A started thread, to be joined or detached.
private final class JoinableThread {
    private(set) var thread = pthread_t()

    init(named name: String, _ body: @escaping @Sendable () -> Void) {
        // SAFETY: the retained box is released exactly once, by the new thread (or below when
        // no thread was created).
        let box = Unmanaged.passRetained(SystemThreadStart(name: name, body: body)).toOpaque()
        let result = pthread_create(&thread, nil, { argument in
            // SAFETY: `argument` is the box passed to pthread_create, retained once for us.
            let start = Unmanaged<SystemThreadStart>.fromOpaque(argument!).takeRetainedValue()
            _ = CSystem_nameThisThread(String(decoding: start.name.utf8.prefix(15), as: UTF8.self))
            start.body()
            return nil
        }, box)
        guard result == 0 else {
            Unmanaged<SystemThreadStart>.fromOpaque(box).release()
            fatalError("cannot start a thread: \(String(cString: strerror(result)))")
        }
    }

    func join() { pthread_join(thread, nil) }
}
