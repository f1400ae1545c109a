import CZlib
import CZstd

public enum LayerDecodeError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The compressed bytes are not a valid stream of the layer's compression.
    case corrupt(String)
    /// The blob ends inside a gzip member or a zstd frame.
    case truncated
    /// The decompressor could not get its memory.
    case noMemory

    public var description: String {
        switch self {
        case .corrupt(let message): return "corrupt compressed data: \(message)"
        case .truncated: return "compressed data ends inside a stream"
        case .noMemory: return "no memory for a decompressor"
        }
    }
}

/// A gzip member's trailer, handed to a decoder's owner that checks the output itself
/// (`checkingMembers: false`).
public struct GzipMemberEnd: Sendable, Equatable {
    /// Where the member's output ends in the uncompressed stream.
    public var uncompressedOffset: Int64
    /// The CRC-32 and the size (modulo 2³²) of the member's output, as its trailer says.
    public var crc: UInt32
    public var sizeModulo: UInt32
}

/// Checks gzip members' output against their trailers, for a decoder that leaves it to its
/// owner: the CRC-32 is then computed beside the decompression instead of inside it.
public struct GzipMemberCheck: Sendable {
    private var crc: UInt = 0
    private var count: Int64 = 0

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return }
        crc = crc32_z(crc, base.assumingMemoryBound(to: Bytef.self), bytes.count)
        count += Int64(bytes.count)
    }

    /// Whether the member's output so far matches `end`; the next member starts afresh.
    public mutating func endMember(_ end: GzipMemberEnd) -> Bool {
        defer { self = GzipMemberCheck() }
        return UInt32(truncatingIfNeeded: crc) == end.crc && UInt32(truncatingIfNeeded: count) == end.sizeModulo
    }
}

/// One layer's decompression from a checkpoint onwards, with no I/O: compressed bytes go in
/// (in order, from `compressedPosition`), uncompressed bytes come out, and with
/// `recordingEvery` it records checkpoints at least that much output apart where a later
/// decoder may start (gzip: deflate block boundaries with their window, the zran technique;
/// zstd: frame starts; both: gzip member starts).
///
/// Not thread-safe: one owner at a time.
// SAFETY: used by one owner at a time, handed from one worker to the next through a lock or a queued job, never shared.
public final class LayerDecoder: @unchecked Sendable {
    public let compression: LayerCompression
    /// The offset in the blob of the next compressed byte `feed` expects.
    public private(set) var compressedPosition: Int64
    /// The offset in the uncompressed stream of the next byte `feed` gives out.
    public private(set) var uncompressedPosition: Int64
    /// Checkpoints recorded since the last `takeRecorded`, beyond the one the decoder started at.
    public private(set) var recorded: [LayerCheckpoint] = []

    /// gzip members ended since the last `takeMemberEnds`, when their output is left to the
    /// owner to check (`checkingMembers: false`).
    public private(set) var memberEnds: [GzipMemberEnd] = []

    public func takeMemberEnds() -> [GzipMemberEnd] {
        defer { memberEnds = [] }
        return memberEnds
    }

    /// The checkpoints recorded so far, handed over (with their windows) and forgotten here.
    public func takeRecorded() -> [LayerCheckpoint] {
        defer { recorded = [] }
        return recorded
    }

    private let spacing: Int64?
    private var lastCheckpoint: Int64
    private let codec: Codec
    /// The output buffer each step writes into; handed to `output`, valid during that call.
    private let outputBuffer: UnsafeMutableRawBufferPointer
    /// The most output `feed` hands over at once.
    public static let outputBufferSize = 128 << 10

    /// - Parameters:
    ///   - spacing: record checkpoints at least this many output bytes apart; nil to record none.
    ///   - checkingMembers: false to leave gzip members' CRC and size to the owner, through
    ///     `memberEnds` and `GzipMemberCheck` (zlib's CRC-32 would otherwise run on the
    ///     decompressing thread).
    public init(compression: LayerCompression, from checkpoint: LayerCheckpoint = .start,
                recordingEvery spacing: Int64? = nil, checkingMembers: Bool = true) throws(LayerDecodeError) {
        self.compression = compression
        self.compressedPosition = checkpoint.compressedOffset
        self.uncompressedPosition = checkpoint.uncompressedOffset
        self.spacing = spacing
        self.lastCheckpoint = checkpoint.uncompressedOffset
        switch compression {
        case .none: codec = .passThrough
        case .gzip: codec = .gzip(try GzipStream(resumingAt: checkpoint, checkingMembers: checkingMembers))
        case .zstd: codec = .zstd(try ZstdStream())
        }
        outputBuffer = .allocate(byteCount: Self.outputBufferSize, alignment: 16)
    }

    deinit { outputBuffer.deallocate() }

    /// Decodes `input`, the compressed bytes at `compressedPosition`, passing each piece of
    /// output to `output`, which returns false to stop early (then `compressedPosition` says how
    /// much of `input` was used). `ends`: `input` runs to the blob's end, so the stream must
    /// end cleanly with it.
    public func feed(_ input: UnsafeRawBufferPointer, ends: Bool,
                     output: (UnsafeRawBufferPointer) -> Bool) throws(LayerDecodeError) {
        var used = 0
        var wanted = true
        switch codec {
        case .passThrough:
            used = input.count
            uncompressedPosition += Int64(input.count)
            compressedPosition += Int64(input.count)
            if !input.isEmpty { wanted = output(input) }
        case .gzip(let stream):
            while wanted && (used < input.count || stream.mayHaveOutput) {
                let step = try stream.step(UnsafeRawBufferPointer(rebasing: input[used...]), into: outputBuffer)
                if step.consumed == 0 && step.produced == 0 && !step.atBoundary { break }
                used += step.consumed
                compressedPosition += Int64(step.consumed)
                uncompressedPosition += Int64(step.produced)
                // Known before the output that completes the member is handed over.
                if let trailer = stream.takeEndedMember() {
                    memberEnds.append(GzipMemberEnd(uncompressedOffset: uncompressedPosition, crc: trailer.crc, sizeModulo: trailer.size))
                }
                if step.produced > 0 {
                    wanted = output(UnsafeRawBufferPointer(rebasing: outputBuffer[..<step.produced]))
                }
                if step.atBoundary, let spacing, uncompressedPosition - lastCheckpoint >= spacing,
                   let checkpoint = stream.checkpoint(uncompressedOffset: uncompressedPosition, compressedOffset: compressedPosition) {
                    recorded.append(checkpoint)
                    lastCheckpoint = uncompressedPosition
                }
            }
            if ends && wanted && used == input.count && !stream.endedCleanly { throw .truncated }
        case .zstd(let stream):
            while wanted && (used < input.count || stream.mayHaveOutput) {
                let step = try stream.step(UnsafeRawBufferPointer(rebasing: input[used...]), into: outputBuffer)
                if step.consumed == 0 && step.produced == 0 { break }
                used += step.consumed
                compressedPosition += Int64(step.consumed)
                if step.produced > 0 {
                    uncompressedPosition += Int64(step.produced)
                    wanted = output(UnsafeRawBufferPointer(rebasing: outputBuffer[..<step.produced]))
                }
                if stream.atFrameEnd, let spacing, uncompressedPosition - lastCheckpoint >= spacing {
                    recorded.append(LayerCheckpoint(kind: .streamStart, uncompressedOffset: uncompressedPosition,
                                                    compressedOffset: compressedPosition))
                    lastCheckpoint = uncompressedPosition
                }
            }
            if ends && wanted && used == input.count && !stream.atFrameEnd { throw .truncated }
        }
    }

    private enum Codec {
        case passThrough
        case gzip(GzipStream)
        case zstd(ZstdStream)
    }
}

struct DecodeStep {
    var consumed: Int
    var produced: Int
    /// Stopped at a point where a checkpoint may be taken.
    var atBoundary = false
}

/// zlib's inflater over a sequence of gzip members, resumable inside a member (raw deflate
/// primed with the checkpoint's bits and window).
final class GzipStream {
    private enum Phase {
        /// Inflating a member; `raw`: resumed mid-member, so zlib sees bare deflate and the
        /// member's trailer is skipped here.
        case inflating(raw: Bool)
        /// The 8-byte trailer (CRC-32, size) of a member inflated raw.
        case trailer(remaining: Int)
        /// A member ended: what follows is another member's header or the blob's end.
        case betweenMembers
    }

    private let stream: UnsafeMutablePointer<z_stream>
    private var phase: Phase
    /// The last compressed byte inflate consumed: a checkpoint's bits come from it.
    private var lastByte: UInt8 = 0
    /// Output in the current member; the window holds no more than that.
    private var initialized = false
    /// The last inflate call filled the output buffer, so more may be pending inside zlib.
    private(set) var mayHaveOutput = false
    /// false: zlib checks no member's CRC and size; the trailers are handed out instead.
    private let checkingMembers: Bool
    /// The last 8 compressed bytes consumed: a member's trailer once it ends.
    private var lastEight: UInt64 = 0
    private var endedMember: (crc: UInt32, size: UInt32)?

    init(resumingAt checkpoint: LayerCheckpoint, checkingMembers: Bool = true) throws(LayerDecodeError) {
        stream = .allocate(capacity: 1)
        stream.initialize(to: z_stream())
        self.checkingMembers = checkingMembers
        switch checkpoint.kind {
        case .streamStart:
            guard CZlib_inflateInit2(stream, 31) == Z_OK else { stream.deallocate(); throw .noMemory }
            if !checkingMembers { inflateValidate(stream, 0) }
            phase = .inflating(raw: false)
        case .deflateBlock:
            guard CZlib_inflateInit2(stream, -15) == Z_OK else { stream.deallocate(); throw .noMemory }
            initialized = true
            phase = .inflating(raw: true)
            if checkpoint.bits > 0 {
                guard inflatePrime(stream, Int32(checkpoint.bits), Int32(checkpoint.primeByte >> (8 - checkpoint.bits))) == Z_OK else {
                    throw .corrupt("checkpoint cannot be restored")
                }
            }
            if !checkpoint.window.isEmpty {
                let status = checkpoint.window.withUnsafeBufferPointer { inflateSetDictionary(stream, $0.baseAddress, UInt32($0.count)) }
                guard status == Z_OK else { throw .corrupt("checkpoint window cannot be restored") }
            }
        }
        initialized = true
    }

    deinit {
        if initialized { inflateEnd(stream) }
        stream.deallocate()
    }

    /// The trailer of the member that just ended, when zlib was not checking it.
    func takeEndedMember() -> (crc: UInt32, size: UInt32)? {
        defer { endedMember = nil }
        return endedMember
    }

    var endedCleanly: Bool {
        if case .betweenMembers = phase { return true }
        return false
    }

    func step(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(LayerDecodeError) -> DecodeStep {
        switch phase {
        case .trailer(let remaining):
            let skipped = min(remaining, input.count)
            phase = remaining - skipped == 0 ? .betweenMembers : .trailer(remaining: remaining - skipped)
            return DecodeStep(consumed: skipped, produced: 0)
        case .betweenMembers:
            guard !input.isEmpty else { return DecodeStep(consumed: 0, produced: 0) }
            guard inflateReset2(stream, 31) == Z_OK else { throw .corrupt("cannot start the next gzip member") }
            if !checkingMembers { inflateValidate(stream, 0) }
            phase = .inflating(raw: false)
            // The start of a member is a checkpoint that needs no window.
            return DecodeStep(consumed: 0, produced: 0, atBoundary: true)
        case .inflating(let raw):
            // SAFETY: zlib reads next_in and writes next_out only inside the inflate call below,
            // while `input` and `output` are alive; it never writes through next_in.
            stream.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
            stream.pointee.avail_in = UInt32(min(input.count, Int(UInt32.max)))
            stream.pointee.next_out = output.baseAddress!.assumingMemoryBound(to: Bytef.self)
            stream.pointee.avail_out = UInt32(output.count)
            let availableIn = Int(stream.pointee.avail_in)
            let status = inflate(stream, Z_BLOCK)
            let consumed = availableIn - Int(stream.pointee.avail_in)
            let produced = output.count - Int(stream.pointee.avail_out)
            if consumed > 0 { lastByte = input[consumed - 1] }
            if !checkingMembers {
                for byte in input[max(0, consumed - 8)..<consumed] { lastEight = lastEight << 8 | UInt64(byte) }
            }
            mayHaveOutput = stream.pointee.avail_out == 0
            switch status {
            case Z_STREAM_END:
                phase = raw ? .trailer(remaining: 8) : .betweenMembers
                mayHaveOutput = false
                if !checkingMembers && !raw {
                    // The trailer is little-endian CRC-32 then size; `lastEight` holds it big-endian.
                    let trailer = lastEight.byteSwapped
                    endedMember = (UInt32(truncatingIfNeeded: trailer), UInt32(truncatingIfNeeded: trailer >> 32))
                }
                return DecodeStep(consumed: consumed, produced: produced)
            case Z_OK, Z_BUF_ERROR:
                let dataType = stream.pointee.data_type
                // After an end-of-block code (128), not in the last block (64): the next block
                // can be started afresh with the window.
                let boundary = status == Z_OK && dataType & 128 != 0 && dataType & 64 == 0
                return DecodeStep(consumed: consumed, produced: produced, atBoundary: boundary)
            default:
                let message = stream.pointee.msg.map { String(cString: $0) } ?? "inflate error \(status)"
                throw .corrupt(message)
            }
        }
    }

    /// A checkpoint at the current position, which must be a boundary `step` reported.
    func checkpoint(uncompressedOffset: Int64, compressedOffset: Int64) -> LayerCheckpoint? {
        switch phase {
        case .inflating(raw: false) where stream.pointee.total_in == 0:
            return LayerCheckpoint(kind: .streamStart, uncompressedOffset: uncompressedOffset, compressedOffset: compressedOffset)
        case .inflating:
            var window = [UInt8](repeating: 0, count: 1 << 15)
            var length: UInt32 = 0
            let status = window.withUnsafeMutableBufferPointer { inflateGetDictionary(stream, $0.baseAddress, &length) }
            guard status == Z_OK else { return nil }
            window.removeLast(window.count - Int(length))
            let bits = UInt8(stream.pointee.data_type & 7)
            return LayerCheckpoint(kind: .deflateBlock, uncompressedOffset: uncompressedOffset, compressedOffset: compressedOffset,
                                   bits: bits, primeByte: bits > 0 ? lastByte : 0, window: window)
        default:
            return nil
        }
    }
}

/// libzstd's streaming decompressor over a sequence of frames.
final class ZstdStream {
    private let stream: OpaquePointer
    /// No frame is in progress: the last one ended (or none began).
    private(set) var atFrameEnd = true
    private(set) var mayHaveOutput = false

    init() throws(LayerDecodeError) {
        guard let stream = ZSTD_createDStream() else { throw .noMemory }
        self.stream = stream
        guard ZSTD_isError(ZSTD_initDStream(stream)) == 0 else { throw .noMemory }
    }

    deinit { ZSTD_freeDStream(stream) }

    func step(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(LayerDecodeError) -> DecodeStep {
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        let hint = ZSTD_decompressStream(stream, &outBuffer, &inBuffer)
        if ZSTD_isError(hint) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(hint))) }
        mayHaveOutput = outBuffer.pos == outBuffer.size
        if hint == 0 {
            atFrameEnd = true
        } else if inBuffer.pos > 0 || outBuffer.pos > 0 {
            atFrameEnd = false
        }
        return DecodeStep(consumed: inBuffer.pos, produced: outBuffer.pos)
    }
}
