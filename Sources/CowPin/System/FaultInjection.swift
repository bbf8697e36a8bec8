import CCowPin
import Glibc
import SystemPackage

/// A harness self-test knob: `COWPIN_INJECT_FAULT=<case-id>:<sigbus|sigsegv|sigkill>`
/// makes the worker crash for real in that case, once its memory is ready.
public struct FaultInjection: Sendable {
    public enum Kind: String, Sendable, CaseIterable { case sigbus, sigsegv, sigkill }
    public static let variable = "COWPIN_INJECT_FAULT"
    public let caseID: String
    public let kind: Kind

    /// The injection the environment asks for; throws on a malformed value.
    public static func fromEnvironment() throws -> FaultInjection? {
        guard let raw = getenv(variable).map({ String(cString: $0) }), !raw.isEmpty else { return nil }
        guard let colon = raw.lastIndex(of: ":"), let kind = Kind(rawValue: String(raw[raw.index(after: colon)...])) else {
            throw HarnessError("\(variable) must be <case-id>:<\(Kind.allCases.map(\.rawValue).joined(separator: "|"))>, got '\(raw)'")
        }
        return FaultInjection(caseID: String(raw[..<colon]), kind: kind)
    }

    /// Crashes the process the way the kernel would.
    public func trigger() -> Never {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        switch kind {
        case .sigbus:
            // A shared mapping of a page the file no longer has: the read faults SIGBUS.
            let fd = cp_memfd_create("cowpin-fault", 0)
            if fd >= 0, ftruncate(fd, off_t(page)) == 0, let p = mmap(nil, page, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED,
               ftruncate(fd, 0) == 0 {
                var b = p.load(as: UInt8.self)
                _ = write(2, &b, 0)
            }
        case .sigsegv:
            if let p = mmap(nil, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED {
                var b = p.load(as: UInt8.self)
                _ = write(2, &b, 0)
            }
        case .sigkill:
            kill(getpid(), SIGKILL)
        }
        fputs("cowpin: \(Self.variable): the \(kind.rawValue) fault did not happen (\(Errno.name(errno)))\n", stderr)
        _exit(3)
    }
}
