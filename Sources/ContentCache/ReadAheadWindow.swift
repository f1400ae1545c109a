/// How far past a read to fetch. It starts small, so that a blob read in a few places costs
/// little more than those places, and doubles with every read that continues where the last
/// one ended, so that a long sequential read soon keeps several range requests in flight.
///
/// "Continues" is loose: the kernel's readahead sends several requests at once and the
/// multi-threaded loop may deliver them out of order, so a read that starts near the last
/// one's end, before or after it, still counts as sequential.
public struct ReadAheadWindow: Sendable, Equatable {
    public let initial: Int64
    public let maximum: Int64
    /// How far from the previous read's end a read may start and still count as sequential.
    public let tolerance: Int64
    public private(set) var current: Int64
    /// Where the furthest read so far ended; nil before the first read.
    public private(set) var lastEnd: Int64?

    public init(initial: Int64, maximum: Int64, tolerance: Int64) {
        self.initial = max(initial, 0)
        self.maximum = max(maximum, self.initial)
        self.tolerance = tolerance
        self.current = self.initial
    }

    /// Records a read of `offset..<end` and returns how many bytes past `end` to fetch.
    public mutating func advance(offset: Int64, end: Int64) -> Int64 {
        if let lastEnd, offset >= lastEnd - tolerance, offset <= lastEnd + tolerance {
            current = min(max(current, 1) * 2, maximum)
            self.lastEnd = max(lastEnd, end)
        } else {
            current = initial
            lastEnd = end
        }
        return current
    }
}
