import CCowPin
import Glibc
import SystemPackage

/// The kernel's gup_test debugfs interface (CONFIG_GUP_TEST): PIN_LONGTERM_TEST
/// takes a long-term pin, R/O unless asked for write; PIN_LONGTERM_TEST_READ
/// copies what the pinned pages hold.
public struct GupTestPin: PinMethod {
    public static let path = "/sys/kernel/debug/gup_test"
    public let fast: Bool
    public init(fast: Bool) { self.fast = fast }

    public var id: String { fast ? "gup-test-ro-fast" : "gup-test-ro" }
    public var summary: String {
        "gup_test PIN_LONGTERM_TEST, R/O long-term pin via \(fast ? "pin_user_pages_fast()" : "pin_user_pages()")"
    }
    public var readOnly: Bool { true }
    /// What only gup_test adds: the long-term R/O pin, through
    /// pin_user_pages() and pin_user_pages_fast(), on every page size. The
    /// R/O unshare on every THP shape is odirect-write's, which needs no
    /// CONFIG_GUP_TEST.
    public var coverage: PinCoverage {
        PinCoverage(events: LongTermEvent.roUnshare.union(LongTermEvent.roLongterm), anon: Backing.withMTHP, matrix: Backing.withMTHP)
    }

    public func unavailable(_ probe: Probe) -> String? {
        probe.gupTest.available ? nil : probe.gupTest.detail
    }

    /// gup_test keeps one long-term pin for the whole debugfs file (kernel
    /// globals, not per open file): two cases pinning at once would take each
    /// other's pin (EINVAL, or a READ of the other case's pages). Its cases run alone.
    public var needs: SharedNeeds { .alone }

    public func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
        let fd = FileDescriptor(rawValue: try check("open(\(Self.path))", cp_gup_test_open(Self.path)))
        let r = cp_gup_pin_longterm_start(fd.rawValue, region.base, region.size, 0, fast ? 1 : 0)
        if r < 0 {
            try? fd.close()
            // gup_test answers EINVAL to a command it does not have: the
            // PIN_LONGTERM_TEST ioctls came with kselftest mm/cow.c in 6.2.
            // (A pin already held is EINVAL too, but these cases run alone
            // and every case stops its pin.)
            if r == -EINVAL, let v = KernelVersion(ctx.probe.kernel.release), v < KernelVersion("6.2")! {
                throw CaseSkip("this kernel's gup_test has no PIN_LONGTERM_TEST ioctl (EINVAL; added in 6.2 with kselftest mm/cow.c)")
            }
            throw SyscallError("PIN_LONGTERM_TEST_START", result: Int(r))
        }
        let pin = GupTestLongterm(fd: fd, size: region.size, fast: fast)
        ctx.onCleanup { pin.release() }
        return pin
    }
}

final class GupTestLongterm: Pin {
    /// nil once released.
    var fd: FileDescriptor?
    let size: Int
    let fast: Bool
    init(fd: FileDescriptor, size: Int, fast: Bool) {
        self.fd = fd
        self.size = size
        self.fast = fast
    }

    var view: String { "pin (gup_test PIN_LONGTERM_TEST_READ)" }
    var observed: Range<Int> { 0..<size }

    func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        var out = [UInt8](repeating: 0, count: size)
        guard let fd else { throw HarnessError("gup_test: the pin was released") }
        _ = try out.withUnsafeMutableBytes { try check("PIN_LONGTERM_TEST_READ", cp_gup_pin_longterm_read(fd.rawValue, $0.baseAddress)) }
        return try out.withUnsafeBytes(body)
    }

    func release() {
        if let fd {
            cp_gup_pin_longterm_stop(fd.rawValue)
            try? fd.close()
            self.fd = nil
        }
    }
}
