import Logging
import SystemSupport

/// swift-log's stream handler with control characters escaped in messages and metadata: both
/// carry text a remote chose (media types, error messages, headers), which must not reach a
/// terminal or a log as escape sequences or forged lines.
struct EscapingLogHandler: LogHandler {
    private var stream: StreamLogHandler

    init(_ stream: StreamLogHandler) { self.stream = stream }

    var logLevel: Logger.Level {
        get { stream.logLevel }
        set { stream.logLevel = newValue }
    }

    var metadata: Logger.Metadata {
        get { stream.metadata }
        set { stream.metadata = newValue.mapValues(Self.escaped) }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { stream[metadataKey: key] }
        set { stream[metadataKey: key] = newValue.map(Self.escaped) }
    }

    func log(event: LogEvent) {
        var event = event
        event.message = Logger.Message(stringLiteral: event.message.description.escapingControlCharacters)
        event.metadata = event.metadata?.mapValues(Self.escaped)
        stream.log(event: event)
    }

    private static func escaped(_ value: Logger.Metadata.Value) -> Logger.Metadata.Value {
        switch value {
        case .string(let text): return .string(text.escapingControlCharacters)
        case .stringConvertible(let convertible): return .string(convertible.description.escapingControlCharacters)
        case .dictionary(let dictionary): return .dictionary(dictionary.mapValues(escaped))
        case .array(let values): return .array(values.map(escaped))
        }
    }
}
