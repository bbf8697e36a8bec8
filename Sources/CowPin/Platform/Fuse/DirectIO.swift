import CCowPin
import Glibc

/// One I/O in flight, submitted so that the submitter does not block: the
/// request may be held by the FUSE server for as long as a case needs.
public protocol InFlightIO: AnyObject {
    /// What submitted it, for evidence ("preadv() from a thread").
    var how: String { get }
    /// Waits (bounded) for completion: bytes transferred (or throws).
    func complete(timeoutMs: Int32) throws -> Int
}

/// How an O_DIRECT I/O is submitted.
public enum Submitter: String, Sendable, CaseIterable {
    /// preadv()/pwritev() from a helper thread.
    case thread
    /// IORING_OP_READ / IORING_OP_WRITE (a plain buffer), forced async.
    case iouring
    /// IORING_OP_READ_FIXED / WRITE_FIXED into a registered buffer (index 0).
    case iouringFixed

    public var summary: String {
        switch self {
        case .thread: return "preadv()/pwritev() from a thread"
        case .iouring: return "io_uring IORING_OP_READ/WRITE (non-fixed buffer)"
        case .iouringFixed: return "io_uring READ_FIXED/WRITE_FIXED into a registered buffer"
        }
    }

    /// Starts `write ? pwrite : pread` of `length` bytes at `address`, file offset 0.
    /// For `.iouringFixed`, `ring` must have the buffer registered.
    public func start(write: Bool, fd: Int32, address: UnsafeMutableRawPointer, length: Int, ring: IoUring?) throws -> InFlightIO {
        switch self {
        case .thread:
            return try ThreadIO(write: write, fd: fd, address: address, length: length)
        case .iouring, .iouringFixed:
            let r = try ring ?? IoUring(entries: 4)
            let op: IoUring.Opcode = self == .iouring ? (write ? .write : .read) : (write ? .writeFixed : .readFixed)
            try r.submit(op, fd: fd, address: address, length: length, offset: 0, userData: 7, async: true)
            return RingIO(ring: r, how: op.name)
        }
    }
}

/// preadv()/pwritev() on a helper thread; its completion is signalled through a pipe.
final class ThreadIO: InFlightIO {
    let done: OSPipe
    let result = Locked<Int?>(nil)
    let how: String
    var finished = false

    init(write: Bool, fd: Int32, address: UnsafeMutableRawPointer, length: Int) throws {
        how = write ? "pwritev() from a thread" : "preadv() from a thread"
        done = try OSPipe()
        let signal = done.writeEnd
        let result = self.result
        let addressBits = UInt(bitPattern: address)
        try startThread {
            var iov = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: addressBits), iov_len: length)
            let n = write ? pwritev(fd, &iov, 1, 0) : preadv(fd, &iov, 1, 0)
            let r = n < 0 ? -Int(errno) : n
            result.with { $0 = r }
            cp_signal(signal)
        }
    }

    func complete(timeoutMs: Int32) throws -> Int {
        let r = cp_await(done.readEnd, timeoutMs)
        if r == -ETIMEDOUT { throw HarnessError("\(how) did not complete within \(timeoutMs) ms") }
        try check("wait for \(how)", r)
        let n = result.with { $0 } ?? -Int(EIO)
        return try check(how, n)
    }
}

final class RingIO: InFlightIO {
    let ring: IoUring
    let how: String
    init(ring: IoUring, how: String) {
        self.ring = ring
        self.how = how
    }

    func complete(timeoutMs: Int32) throws -> Int {
        let (_, res) = try ring.complete(timeoutMs: timeoutMs)
        return try check("\(how) completion", Int(res))
    }
}
