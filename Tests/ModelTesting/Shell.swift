import Foundation

/// A shell command a test ran that exited with another status than 0.
public struct ShellCommandFailed: Error, CustomStringConvertible {
    public let command: String
    public let status: Int32
    public var description: String { "`\(command)` failed with status \(status)" }
}

/// Runs `command` with /bin/sh and returns its stdout; throws when it fails.
@discardableResult
public func shell(_ command: String) throws -> [UInt8] {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", command]
    let stdout = Pipe()
    process.standardOutput = stdout
    try process.run()
    let output = stdout.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw ShellCommandFailed(command: command, status: process.terminationStatus) }
    return Array(output)
}
