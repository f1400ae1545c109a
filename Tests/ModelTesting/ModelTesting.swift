/// xorshift64*: the same sequences on every machine.
public struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64

    public init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }

    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}

/// A failing sequence of steps made minimal: drops steps one at a time, keeping each drop
/// after which the sequence still fails, until none can go.
public func shrink<Step>(_ steps: [Step], stillFails: ([Step]) -> Bool) -> [Step] {
    var current = steps
    var changed = true
    while changed {
        changed = false
        var index = 0
        while index < current.count {
            var candidate = current
            candidate.remove(at: index)
            if stillFails(candidate) {
                current = candidate
                changed = true
            } else {
                index += 1
            }
        }
    }
    return current
}

/// `count` random steps for sequence `seed`, and the generator to go on with.
public func randomSteps(seed: UInt64, count: ClosedRange<Int>) -> [UInt32] {
    var generator = SeededGenerator(seed: seed)
    return (0..<Int.random(in: count, using: &generator)).map { _ in UInt32.random(in: 0...UInt32.max, using: &generator) }
}
