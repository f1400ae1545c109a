import CLibFuzzer
import FuzzTargets
#if canImport(Glibc)
import Glibc
#endif

// Usage: ocicachefs-fuzz TARGET [libFuzzer options] [corpus directories or inputs]
guard selectedTarget != nil else {
    let names = FuzzTarget.allCases.map(\.rawValue).joined(separator: " ")
    print("usage: \(CommandLine.arguments[0]) TARGET [libFuzzer options] [corpus directories]\ntargets: \(names)")
    exit(2)
}

// libFuzzer's own main would take the target name for a corpus directory: hand it the command
// line without it.
var arguments: [UnsafeMutablePointer<CChar>?] = [CommandLine.unsafeArgv[0]]
for index in 2..<Int(CommandLine.argc) { arguments.append(CommandLine.unsafeArgv[index]) }
arguments.append(nil)
var argumentCount = CInt(arguments.count - 1)
// SAFETY: libFuzzer uses argv only within LLVMFuzzerRunDriver, which returns inside this closure.
let status = arguments.withUnsafeMutableBufferPointer { buffer in
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = buffer.baseAddress
    return LLVMFuzzerRunDriver(&argumentCount, &argv, runSelectedTarget)
}
exit(status)
