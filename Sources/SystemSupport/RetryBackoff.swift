/// The one pause policy between attempts at something that failed and may pass: 250 ms after
/// the first failure, doubling with each failure in a row, never more than 4 s.
public struct RetryBackoff: Sendable, Equatable {
    public static let first: Duration = .milliseconds(250)
    public static let maximum: Duration = .seconds(4)

    /// Failures in a row so far.
    public private(set) var failures = 0
    /// No new attempt before this.
    public private(set) var notBefore: ContinuousClock.Instant?

    public init() {}

    public static func pause(afterFailures failures: Int) -> Duration {
        guard failures > 0 else { return .zero }
        return min(first * (1 << min(failures - 1, 8)), maximum)
    }

    public mutating func recordFailure(at now: ContinuousClock.Instant = .now) {
        failures += 1
        notBefore = now + Self.pause(afterFailures: failures)
    }

    /// What is left of the pause, or nil when an attempt may start now.
    public func remainingPause(at now: ContinuousClock.Instant = .now) -> Duration? {
        guard let notBefore, notBefore > now else { return nil }
        return now.duration(to: notBefore)
    }
}
