/// How far past a read to fetch. It starts small, so that a blob read in a few places costs
/// little more than those places, and grows with the sequential run: each time the reader has
/// consumed as much as the window, the window doubles, so it never reaches further ahead than
/// the reader has read (a partial read pulls at most about twice what it read, plus rounding
/// to a chunk) while a long sequential read soon keeps several chunk requests in flight.
///
/// "Sequential" is loose: the kernel's readahead sends several requests at once and the
/// multi-threaded loop may deliver them out of order, so a read that starts near the last
/// one's end, before or after it, continues the run.
public struct ReadAheadWindow: Sendable, Equatable {
    public let initial: Int64
    public let maximum: Int64
    /// How far from the previous read's end a read may start and still continue the run.
    public let tolerance: Int64
    public private(set) var current: Int64
    /// Where the furthest read of the run ended; nil before the first read.
    public private(set) var lastEnd: Int64?
    /// Where the current sequential run started.
    public private(set) var runStart: Int64 = 0

    public init(initial: Int64, maximum: Int64, tolerance: Int64) {
        self.initial = max(initial, 0)
        self.maximum = max(maximum, self.initial)
        self.tolerance = tolerance
        self.current = self.initial
    }

    /// Records a read of `offset..<end` and returns how many bytes past `end` to fetch.
    public mutating func advance(offset: Int64, end: Int64) -> Int64 {
        if let lastEnd, offset >= lastEnd - tolerance, offset <= lastEnd + tolerance {
            self.lastEnd = max(lastEnd, end)
            while current < maximum && self.lastEnd! - runStart >= max(current, 1) * 2 {
                current = min(max(current, 1) * 2, maximum)
            }
        } else {
            current = initial
            runStart = offset
            lastEnd = end
        }
        return current
    }
}
