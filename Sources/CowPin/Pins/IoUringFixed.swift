import CCowPin
import Glibc
import SystemPackage

/// io_uring fixed buffers: IORING_REGISTER_BUFFERS takes a long-term R/W pin
/// (FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE). The pin's view is observed with
/// IORING_OP_WRITE_FIXED into a memfd, read in place through a MAP_SHARED
/// mapping of it.
public struct IoUringFixedPin: PinMethod {
    public init() {}
    public var id: String { "iouring-fixed" }
    public var summary: String { "io_uring fixed buffer (IORING_REGISTER_BUFFERS: FOLL_PIN|FOLL_LONGTERM|FOLL_WRITE)" }
    public var readOnly: Bool { false }
    /// Every event on every shape, and `pagecache-write` on every file kind.
    public var coverage: PinCoverage { PinCoverage(pagecache: Self.pagecacheBackings) }

    public func unavailable(_ probe: Probe) -> String? {
        probe.ioUring.usable ? nil : "io_uring unavailable: \(probe.ioUring.detail)"
    }

    public func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
        let ring = try IoUring(entries: 4)
        try ring.register(region)
        return Self.held(ring: ring, region: region, in: ctx)
    }

    /// The pin `ring` holds on `region` (registered as buffer 0), released when the case ends.
    static func held(ring: IoUring, region: Region, in ctx: CaseContext) -> Pin {
        let pin = IoUringFixed(ring: ring, region: region, timeoutMs: ctx.timeoutMs)
        ctx.onCleanup { pin.release() }
        return pin
    }

    /// The backings of `pagecache-write`: every file kind. io_uring refuses
    /// buffers in some file mappings (a policy that changed in 5.14 and 6.5,
    /// and that stable kernels change by backport): where this kernel
    /// refuses the buffer, the case skips saying so, and
    /// longterm-file/iouring-fixed-* records the refusal as a policy fact.
    static let pagecacheBackings: [Backing] = Backing.privateFiles.map { b in
        Backing(id: b.id, summary: b.summary, tags: b.tags, needs: b.needs) { ctx in
            let r = try b.make(ctx)
            let fs = try FileSystem.of(r.file!)
            // io_uring has taken buffers in hugetlbfs mappings since it
            // began (5.1); probing would need a second huge page.
            if fs == FileSystem.hugetlbfs { return r }
            // Asked of the kernel (not predicted from its version), on a
            // second private mapping of the file: the case's own mapping
            // keeps its pagecache page until the case pins it.
            var err: Int32 = 0
            guard let probe = cp_mmap_fd(r.size, Int32(CP_PROT_READ_WRITE), 0, r.file!, 0, &err) else {
                throw SyscallError("mmap(MAP_PRIVATE) of the file", errno: err)
            }
            defer { munmap(probe, r.size) }
            if let refused = try IoUring(entries: 4).tryRegister(base: probe, size: r.size) {
                throw CaseSkip("this kernel's io_uring refuses a buffer in a MAP_PRIVATE \(FileSystem.name(fs)) mapping (\(Errno.name(refused))): a policy, recorded by longterm-file/iouring-fixed-private/*")
            }
            return r
        }
    }
}

/// An io_uring instance.
public final class IoUring {
    let ring: OpaquePointer

    public init(entries: UInt32) throws {
        var r: OpaquePointer?
        try check("io_uring_queue_init", cp_ring_open(&r, entries))
        ring = r!
    }

    deinit { cp_ring_close(ring) }

    /// IORING_REGISTER_BUFFERS of the whole region as buffer 0: a long-term
    /// R/W pin. Skips when RLIMIT_MEMLOCK is too small (not root).
    public func register(_ region: Region) throws {
        if let refused = try tryRegister(region) {
            throw SyscallError("io_uring_register_buffers(\(region.size) bytes)", errno: refused)
        }
    }

    /// IORING_REGISTER_BUFFERS of the region as buffer 0: nil when the kernel
    /// took the pin, else the errno it refused it with. Skips when
    /// RLIMIT_MEMLOCK is too small (not root).
    public func tryRegister(_ region: Region) throws -> Int32? {
        try tryRegister(base: region.base, size: region.size)
    }

    public func tryRegister(base: UnsafeMutableRawPointer, size: Int) throws -> Int32? {
        let r = cp_ring_register_buffer(ring, base, size)
        if r == -ENOMEM && !Probe.isRoot, let soft = Probe.memlockLimit().soft, soft < UInt64(size) {
            throw CaseSkip("RLIMIT_MEMLOCK (\(soft) bytes) is below the \(size)-byte buffer to register")
        }
        return r < 0 ? -r : nil
    }

    public enum Opcode: Int32 {
        case read = 0, write = 1, readFixed = 2, writeFixed = 3
        var name: String { ["IORING_OP_READ", "IORING_OP_WRITE", "IORING_OP_READ_FIXED", "IORING_OP_WRITE_FIXED"][Int(rawValue)] }
    }

    /// Submits one request; `async` punts it to an io-wq worker (IOSQE_ASYNC)
    /// so a request that blocks (a held FUSE request) never blocks the caller.
    public func submit(_ op: Opcode, fd: Int32, address: UnsafeMutableRawPointer, length: Int, offset: Int64,
                       userData: UInt64, async: Bool = false) throws {
        try check("io_uring submit \(op.name)", cp_ring_submit(ring, op.rawValue, fd, address, length, offset, userData, async ? 1 : 0))
    }

    /// Waits (bounded) for one completion: (user data, result).
    public func complete(timeoutMs: Int32) throws -> (UInt64, Int32) {
        var ud: UInt64 = 0
        var res: Int32 = 0
        let r = cp_ring_wait(ring, timeoutMs, &ud, &res)
        if r == -ETIMEDOUT { throw HarnessError("no io_uring completion within \(timeoutMs) ms") }
        try check("io_uring_wait_cqe", r)
        return (ud, res)
    }

    /// Submits and waits (bounded); returns the completion's result (>= 0).
    @discardableResult
    public func perform(_ op: Opcode, fd: Int32, address: UnsafeMutableRawPointer, length: Int, offset: Int64, timeoutMs: Int32) throws -> Int {
        try submit(op, fd: fd, address: address, length: length, offset: offset, userData: 1)
        let (_, res) = try complete(timeoutMs: timeoutMs)
        return try check("\(op.name) completion", Int(res))
    }
}

final class IoUringFixed: Pin {
    let ring: IoUring
    let region: Region
    /// The registered address: WRITE_FIXED must name it even after the
    /// process mremap()s the region elsewhere.
    let address: UnsafeMutableRawPointer
    let timeoutMs: Int32
    var registered = true

    init(ring: IoUring, region: Region, timeoutMs: Int32) {
        self.ring = ring
        self.region = region
        address = region.base
        self.timeoutMs = timeoutMs
    }

    var view: String { "pin (io_uring WRITE_FIXED of the registered buffer, read back)" }
    var observed: Range<Int> { 0..<region.size }

    func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let file = try MemfdView.take(size: region.size)
        // The write covers the whole file: every byte of the view comes from
        // the pinned pages, whatever an earlier view left there. A file whose
        // write failed (or may still be in flight) is not reused.
        let n = try ring.perform(.writeFixed, fd: file.fd, address: address, length: region.size, offset: 0, timeoutMs: timeoutMs)
        guard n == region.size else { throw HarnessError("WRITE_FIXED wrote \(n) of \(region.size) bytes") }
        defer { MemfdView.give(file) }
        return try body(file.bytes)
    }

    func release() {
        if registered {
            cp_ring_unregister_buffers(ring.ring)
            registered = false
        }
    }
}

/// A memfd of a fixed size, mapped MAP_SHARED read-only once: what a device
/// path writes into the file is read in place through the mapping, with no
/// copy back. Files up to 4 MiB are kept for the next view of the same size
/// (their pages stay allocated: no shmem allocation and clearing per read).
final class MemfdView {
    let descriptor: FileDescriptor
    var fd: Int32 { descriptor.rawValue }
    let base: UnsafeMutableRawPointer
    let size: Int
    static let pool = SizePool<MemfdView>()

    private init(size: Int) throws {
        let fd = FileDescriptor(rawValue: try check("memfd_create", cp_memfd_create("cowpin-pin-view", 0)))
        do {
            try fd.resize(to: Int64(size))
        } catch {
            try? fd.close()
            throw SyscallError("ftruncate(memfd, \(size))", error)
        }
        var err: Int32 = 0
        guard let p = cp_mmap_fd(size, Int32(CP_PROT_READ), 1, fd.rawValue, 0, &err) else {
            try? fd.close()
            throw SyscallError("mmap(memfd, MAP_SHARED)", errno: err)
        }
        self.descriptor = fd
        self.base = p
        self.size = size
    }

    deinit {
        cp_munmap(base, size)
        try? descriptor.close()
    }

    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    static func take(size: Int) throws -> MemfdView {
        try pool.take(size: size) ?? MemfdView(size: size)
    }

    static func give(_ view: MemfdView) { pool.give(view, size: view.size) }
}
