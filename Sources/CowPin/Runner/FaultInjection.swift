import CCowPin
import Glibc
import SystemPackage

/// A harness self-test knob: `COWPIN_INJECT_FAULT=<case-id>:<sigbus|sigsegv|sigkill|hang|lkdtm=TYPE>`
/// makes the worker crash for real in that case, once its memory is ready.
public struct FaultInjection: Sendable {
    /// `hang` makes a real hung task (see `HungTask`) and goes on with the
    /// case; `lkdtm=TYPE` asks the kernel's crash test module (CONFIG_LKDTM)
    /// for TYPE (WARNING, SOFTLOCKUP, HUNG_TASK, EXCEPTION...) from the case.
    public enum Kind: String, Sendable, CaseIterable { case sigbus, sigsegv, sigkill, hang, lkdtm }
    public static let variable = "COWPIN_INJECT_FAULT"
    public let caseID: String
    public let kind: Kind
    /// The LKDTM crash type, for `lkdtm`.
    public var lkdtmType: String?
    public static let lkdtmPath = "/sys/kernel/debug/provoke-crash/DIRECT"

    /// The injection the environment asks for; throws on a malformed value.
    public static func fromEnvironment() throws -> FaultInjection? {
        guard let raw = getenv(variable).map({ String(cString: $0) }), !raw.isEmpty else { return nil }
        let kinds = Kind.allCases.map { $0 == .lkdtm ? "lkdtm=TYPE" : $0.rawValue }.joined(separator: "|")
        guard let colon = raw.lastIndex(of: ":") else { throw HarnessError("\(variable) must be <case-id>:<\(kinds)>, got '\(raw)'") }
        let value = raw[raw.index(after: colon)...]
        if value.hasPrefix("lkdtm="), value.count > 6, value.dropFirst(6).allSatisfy({ $0.isUppercase || $0.isNumber || $0 == "_" }) {
            var f = FaultInjection(caseID: String(raw[..<colon]), kind: .lkdtm)
            f.lkdtmType = String(value.dropFirst(6))
            return f
        }
        guard let kind = Kind(rawValue: String(value)), kind != .lkdtm else {
            throw HarnessError("\(variable) must be <case-id>:<\(kinds)>, got '\(raw)'")
        }
        return FaultInjection(caseID: String(raw[..<colon]), kind: kind)
    }

    init(caseID: String, kind: Kind) {
        self.caseID = caseID
        self.kind = kind
    }

    /// Injects the fault: crashes the process, makes a hung task and returns
    /// once the kernel reported it (or, where its timeout is long, at once),
    /// or asks LKDTM for a crash (it returns when the kernel does).
    public func inject(timeoutMs: Int32) {
        if kind == .lkdtm, let type = lkdtmType {
            let fd = open(Self.lkdtmPath, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else {
                fputs("cowpin: \(Self.variable): cannot open \(Self.lkdtmPath) (\(Errno.name(errno))): no LKDTM here (CONFIG_LKDTM, debugfs)\n", stderr)
                _exit(3)
            }
            let n = write(fd, type, type.utf8.count)
            let err = errno
            close(fd)
            fputs("cowpin: \(Self.variable): LKDTM \(type): write \(n < 0 ? "failed (\(Errno.name(err)))" : "returned")\n", stderr)
            return
        }
        guard kind == .hang else { trigger() }
        do {
            let o = try HungTask.make(timeoutMs: timeoutMs)
            fputs("cowpin: \(Self.variable): the hung task (pid \(o.pid), state \(o.state)) was \(o.reported ? "reported by the kernel after \(o.waitedMs) ms" : "not waited for (kernel.hung_task_timeout_secs \(HungTask.timeoutSecs.map(String.init) ?? "?") is too long to wait)")\n", stderr)
        } catch {
            fputs("cowpin: \(Self.variable): the hang did not happen: \(error)\n", stderr)
            _exit(3)
        }
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
        case .hang, .lkdtm:
            break
        }
        fputs("cowpin: \(Self.variable): the \(kind.rawValue) fault did not happen (\(Errno.name(errno)))\n", stderr)
        _exit(3)
    }
}
