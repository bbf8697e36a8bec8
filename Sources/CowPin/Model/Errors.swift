import Glibc
import SystemPackage

/// A syscall (or libc/liburing call) that failed, with its errno.
public struct SyscallError: Error, CustomStringConvertible, Equatable, Sendable {
    public var call: String
    public var errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    /// From a thrown `Errno` (swift-system); any other error counts as EIO.
    public init(_ call: String, _ error: any Error) {
        self.init(call, errno: (error as? Errno)?.rawValue ?? EIO)
    }

    /// From a shim return value: a negative number is -errno.
    public init(_ call: String, result: Int) {
        self.init(call, errno: Int32(-result))
    }

    public var description: String { "\(call): \(Errno.name(errno)) (\(Errno.message(errno)))" }
}

/// The names of the errnos cowpin reports.
private let errnoNames: [Int32: String] = [
    EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO",
    E2BIG: "E2BIG", EBADF: "EBADF", ECHILD: "ECHILD", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM",
    EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY", EEXIST: "EEXIST", ENODEV: "ENODEV",
    EINVAL: "EINVAL", ENFILE: "ENFILE", EMFILE: "EMFILE", ENOSPC: "ENOSPC", EPIPE: "EPIPE",
    ENOSYS: "ENOSYS", EOPNOTSUPP: "EOPNOTSUPP", ETIMEDOUT: "ETIMEDOUT", ETIME: "ETIME",
    ENXIO: "ENXIO", EROFS: "EROFS", ECANCELED: "ECANCELED", ENODATA: "ENODATA",
]

extension Errno {
    /// "EBADF"; "errno 123" for one without a name here.
    public var name: String { errnoNames[rawValue] ?? "errno \(rawValue)" }

    public static func name(_ err: Int32) -> String { Errno(rawValue: err).name }

    /// strerror()'s text: "Bad file descriptor".
    public static func message(_ err: Int32) -> String { Errno(rawValue: err).description }
}

/// Checks a shim return value (>= 0 success, < 0 is -errno).
@discardableResult
func check(_ call: String, _ result: Int32) throws -> Int32 {
    if result < 0 { throw SyscallError(call, result: Int(result)) }
    return result
}

@discardableResult
func check(_ call: String, _ result: Int) throws -> Int {
    if result < 0 { throw SyscallError(call, result: result) }
    return result
}

/// The case cannot run here; the reason says precisely why.
public struct CaseSkip: Error, CustomStringConvertible, Sendable {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The harness itself failed (a setup step, a wait that timed out, a child
/// that died). Never a finding about the kernel.
public struct HarnessError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
