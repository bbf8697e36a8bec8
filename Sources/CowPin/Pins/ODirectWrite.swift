import CCowPin

/// An O_DIRECT write that cowpin's FUSE server leaves queued: the kernel has
/// taken the source pages R/O (FUSE direct I/O: FOLL_PIN via
/// iov_iter_extract_pages() since 6.9, a FOLL_GET reference before) and copies
/// them only when the server reads the request. A short-term R/O pin that needs
/// no CONFIG_GUP_TEST and no device: for anonymous memory it takes the same
/// unshare decision (gup_must_unshare()) as a long-term R/O pin, so it runs the
/// R/O-pin events on every memory shape.
public struct ODirectWritePin: PinMethod {
    /// One FUSE request: the server does not offer FUSE_MAX_PAGES in INIT, so
    /// the kernel sends at most 32 pages per request. The pin covers the first
    /// request; the rest of a larger write is pinned only after it is answered.
    public static let pinnedBytes = 32 * 4096

    public init() {}

    public var id: String { "odirect-write" }
    public var summary: String {
        "O_DIRECT write held in the FUSE queue, a R/O pin of the source pages (FOLL_PIN since 6.9)"
    }
    public var readOnly: Bool { true }
    /// A short-term R/O pin: the anonymous unshare events on every shape
    /// (short-term pins of the zeropage or pagecache are not meant to follow
    /// later writes).
    public var coverage: PinCoverage { PinCoverage(events: LongTermEvent.roUnshare) }

    public func unavailable(_ probe: Probe) -> String? { FuseServer.unavailable(probe) }

    public func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
        try QueuedWrite(ctx, .thread, length: min(region.size, Self.pinnedBytes))
    }
}

/// An O_DIRECT write of the region's first `length` bytes (file offset 0),
/// queued while the server reads nothing. `withView` lets the server read the
/// request, which copies what the pinned pages hold at that moment. It can be
/// read once: the request is gone afterwards.
public final class QueuedWrite: Pin {
    public let server: FuseServer
    let io: InFlightIO
    let length: Int
    let timeoutMs: Int32
    var consumed = false

    public init(_ ctx: CaseContext, _ sub: Submitter, length: Int) throws {
        server = try ctx.fuseServer()
        let fd = try ctx.open(server)
        try server.closeGate()
        io = try sub.start(write: true, fd: fd, address: ctx.region.base, length: length, ring: nil)
        try server.awaitQueuedRequest()
        self.length = length
        timeoutMs = ctx.timeoutMs
    }

    public var view: String { "pin (the data of the held O_DIRECT write, as the FUSE server receives it)" }
    public var observed: Range<Int> { 0..<length }

    public func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard !consumed else { throw HarnessError("the held O_DIRECT write was already read: it can be read once") }
        consumed = true
        try server.openGate()
        let w = try server.awaitWrite()
        guard w.offset == 0, w.data.count == length else {
            throw HarnessError("FUSE WRITE at \(w.offset) of \(w.data.count) bytes, expected 0 and \(length)")
        }
        let n = try io.complete(timeoutMs: timeoutMs)
        guard n == length else { throw HarnessError("\(io.how) returned \(n), expected \(length)") }
        return try w.data.withUnsafeBytes(body)
    }

    /// The case's cleanup shuts the server down, which fails a write still queued.
    public func release() {}
}

extension FuseServer {
    /// Why cowpin's FUSE server cannot be mounted here, or nil: what every
    /// case that holds I/O in it requires.
    public static func unavailable(_ p: Probe) -> String? {
        if !p.fuse.available { return "FUSE unavailable: \(p.fuse.detail)" }
        if !p.privileges.capSysAdmin { return "mounting cowpin's FUSE file system needs CAP_SYS_ADMIN (run as root)" }
        return nil
    }
}
