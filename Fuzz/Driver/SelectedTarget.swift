import FuzzTargets

/// The target named by the first argument; the rest of the command line is libFuzzer's.
let selectedTarget: FuzzTarget? = CommandLine.arguments.dropFirst().first.flatMap(FuzzTarget.init(rawValue:))

func runSelectedTarget(_ data: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    // SAFETY: libFuzzer hands over `count` readable bytes at `data` for the duration of the call.
    selectedTarget!.run(Array(UnsafeRawBufferPointer(start: data, count: count)))
    return 0
}
