import Glibc
import SystemPackage

extension Supervisor {
    /// How a worker ended.
    struct Outcome: CustomStringConvertible {
        enum How { case finished, exited(Int32), killed(Int32) }
        var how: How
        var pid: pid_t = 0

        init(_ how: How, pid: pid_t = 0) {
            self.how = how
            self.pid = pid
        }

        init(waitStatus s: Int32, pid: pid_t) {
            if s & 0x7f == 0 {
                let code = (s >> 8) & 0xff
                self.init(code == 0 ? .finished : .exited(code), pid: pid)
            } else {
                self.init(.killed(s & 0x7f), pid: pid)
            }
        }

        var finished: Bool {
            if case .finished = how { return true }
            return false
        }

        var description: String {
            switch how {
            case .finished: return "exited (status 0)"
            case .exited(let code): return "exited with status \(code)"
            case .killed(let sig): return "was killed by \(signalDescription(sig))"
            }
        }

        /// For SIGKILL: whether the kernel log shows the OOM killer choosing the worker.
        var hint: String {
            guard case .killed(SIGKILL) = how else { return "" }
            switch Supervisor.oomKill(of: pid) {
            case .some(let line?): return " (the OOM killer: \(line))"
            case .some(nil): return " (not by the OOM killer: the kernel log does not show it killing pid \(pid))"
            case nil: return " (the OOM killer sends SIGKILL: see the kernel log)"
            }
        }
    }

    /// The kernel log's line about the OOM killer killing `pid`: nil when the
    /// log cannot be read, .some(nil) when it has no such line.
    static func oomKill(of pid: pid_t) -> String?? {
        guard let fd = try? FileDescriptor.open("/dev/kmsg", .readOnly, options: [.nonBlocking, .closeOnExec]) else { return nil }
        defer { try? fd.close() }
        var found: String?
        var record = [UInt8](repeating: 0, count: 8192)
        while true {
            let n: Int
            do {
                n = try record.withUnsafeMutableBytes { try fd.read(into: $0) }
            } catch Errno.brokenPipe {
                continue  // a record was overwritten while reading
            } catch {
                break  // EAGAIN: the end of the log
            }
            if n == 0 { break }
            // "prio,seq,usec,flags;Out of memory: Killed process PID (cowpin) ..."
            let text = String(decoding: record[0..<n], as: UTF8.self)
            guard let semi = text.firstIndex(of: ";") else { continue }
            let message = text[text.index(after: semi)...].prefix { $0 != "\n" }
            if message.contains("Killed process \(pid) (") { found = String(message) }
        }
        return .some(found)
    }
}
