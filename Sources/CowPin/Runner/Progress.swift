import Glibc

/// `COWPIN_PROGRESS=FILE`: a line appended to FILE as each case run starts
/// (`start N ID`) and ends (`end N ID VERDICT`), written by the process that
/// runs it (the worker) right before and after, so that it never lags behind.
/// When the kernel dies in the middle of a run (a lockup or hung task that
/// panics a VM), the file says which cases were running: scripts/vm-run reads it.
final class Progress: @unchecked Sendable {
    static let shared = Progress.fromEnvironment()

    let fd: Int32

    init?(path: String) {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return nil }
    }

    static func fromEnvironment() -> Progress? {
        guard let p = getenv("COWPIN_PROGRESS").map({ String(cString: $0) }), !p.isEmpty else { return nil }
        return Progress(path: p)
    }

    func note(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
