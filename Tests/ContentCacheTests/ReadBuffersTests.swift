@testable import ContentCache
import Dispatch
import Foundation
import Synchronization
import Testing

@Suite struct ReadBuffersTests {
    @Test func aBufferIsReusedRatherThanMappedAgain() {
        let buffers = ReadBuffers(size: 1 << 20, count: 2)
        let first = buffers.withBuffer(count: 4096) { buffer -> Int in
            buffer.storeBytes(of: 0xAB, toByteOffset: 0, as: UInt8.self)
            return Int(bitPattern: buffer.baseAddress)
        }
        let second = buffers.withBuffer(count: 1 << 20) { buffer -> (Int, UInt8) in
            (Int(bitPattern: buffer.baseAddress), buffer.load(fromByteOffset: 0, as: UInt8.self))
        }
        #expect(second?.0 == first)
        #expect(second?.1 == 0xAB)
    }

    @Test func aRequestLargerThanTheBuffersGetsItsOwnMemory() {
        let buffers = ReadBuffers(size: 4096, count: 1)
        let count = buffers.withBuffer(count: 3 * 4096 + 1) { buffer -> Int in
            buffer.initializeMemory(as: UInt8.self, repeating: 7)
            return buffer.count
        }
        #expect(count == 3 * 4096 + 1)
        #expect(buffers.withBuffer(count: 0) { $0.count } == 0)
    }

    /// The cap is what bounds the daemon's memory: a borrower beyond it must wait, not allocate.
    @Test func aBorrowerBeyondTheCountWaitsForOneToComeBack() {
        let buffers = ReadBuffers(size: 4096, count: 2)
        let holding = DispatchSemaphore(value: 0)
        let letGo = DispatchSemaphore(value: 0)
        let holdersDone = DispatchSemaphore(value: 0)
        // Threads of their own: a dispatch queue may not start a third block while two are blocked.
        for _ in 0..<2 {
            Thread.detachNewThread {
                _ = buffers.withBuffer(count: 4096) { _ in
                    holding.signal()
                    letGo.wait()
                }
                holdersDone.signal()
            }
        }
        holding.wait()
        holding.wait()

        let thirdStarted = DispatchSemaphore(value: 0)
        let thirdGotOne = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            thirdStarted.signal()
            _ = buffers.withBuffer(count: 4096) { _ in thirdGotOne.signal() }
        }
        thirdStarted.wait()
        #expect(thirdGotOne.wait(timeout: .now() + 0.3) == .timedOut, "a third borrower got a buffer while two were out")
        letGo.signal()
        #expect(thirdGotOne.wait(timeout: .now() + 10) == .success, "the third borrower never got the returned buffer")
        letGo.signal()
        #expect(holdersDone.wait(timeout: .now() + 10) == .success)
        #expect(holdersDone.wait(timeout: .now() + 10) == .success)
    }
}
