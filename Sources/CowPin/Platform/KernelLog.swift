import Glibc

/// One record of the kernel's log as `/dev/kmsg` gives it:
/// `PRIO,SEQ,TS_USEC,FLAGS[,...];TEXT` and, on the next lines, ` KEY=VALUE`
/// properties. PRIO is `facility << 3 | level`: the kernel's own messages
/// have facility 0, and what userspace writes to `/dev/kmsg` has facility 1
/// (user) or another non-zero one (the kernel never lets userspace claim 0).
public struct KernelRecord: Equatable, Sendable {
    public var facility: Int
    public var level: Int
    public var seq: UInt64
    public var usec: UInt64
    /// The message, with the kernel's `\xNN` escapes of control bytes kept.
    public var text: String

    public var fromKernel: Bool { facility == 0 }

    /// As dmesg prints it: `[   12.345678] text`.
    public var line: String {
        let s = String(usec / 1_000_000), f = String(usec % 1_000_000)
        return "[" + String(repeating: " ", count: max(0, 5 - s.count)) + s + "." + String(repeating: "0", count: 6 - f.count) + f + "] " + text
    }

    /// Parses one record read from `/dev/kmsg`; nil when it is not one.
    public init?(_ raw: ArraySlice<UInt8>) {
        guard let semi = raw.firstIndex(of: UInt8(ascii: ";")) else { return nil }
        let fields = raw[raw.startIndex..<semi].split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false)
        guard fields.count >= 4, let prio = Int(String(decoding: fields[0], as: UTF8.self)),
              let seq = UInt64(String(decoding: fields[1], as: UTF8.self)),
              let usec = UInt64(String(decoding: fields[2], as: UTF8.self)) else { return nil }
        let body = raw[(semi + 1)...]
        let end = body.firstIndex(of: 10) ?? body.endIndex
        self.facility = prio >> 3
        self.level = prio & 7
        self.seq = seq
        self.usec = usec
        self.text = String(decoding: body[..<end], as: UTF8.self)
    }

    public init(facility: Int = 0, level: Int, seq: UInt64, usec: UInt64, text: String) {
        self.facility = facility
        self.level = level
        self.seq = seq
        self.usec = usec
        self.text = text
    }
}

/// A report of the kernel about itself, found in its log: a WARN, a BUG, an
/// oops, a bad page, a lockup, a stall, a hung task, a KASAN or KFENCE
/// report, with the lines that follow it (the trace).
public struct KernelReport: Codable, Equatable, Sendable {
    /// "WARNING", "BUG", "Oops", "Bad page", "soft lockup", "hard lockup",
    /// "RCU stall", "hung task", "KASAN", "KFENCE", "UBSAN".
    public var kind: String
    /// The line that starts it ("WARNING: CPU: 0 PID: 12 at mm/gup.c:...").
    public var headline: String
    /// The report as the kernel printed it, its trace included.
    public var lines: [String]

    public init(kind: String, headline: String, lines: [String]) {
        self.kind = kind
        self.headline = headline
        self.lines = lines
    }

    /// The kind of report a kernel line starts, or nil. The more specific
    /// patterns come first ("BUG: KASAN:" is KASAN, not BUG).
    public static func kind(of text: String) -> String? {
        let t = Substring(text)
        func has(_ s: String) -> Bool { t.contains(s) }
        if t.hasPrefix("WARNING:") { return "WARNING" }
        if has("BUG: soft lockup") { return "soft lockup" }
        if has("Watchdog detected hard LOCKUP") || has("NMI watchdog: hard LOCKUP") { return "hard lockup" }
        if t.hasPrefix("rcu: INFO: rcu_") && has("stall") { return "RCU stall" }
        if t.hasPrefix("INFO: task ") && has(" blocked for more than ") { return "hung task" }
        if t.hasPrefix("BUG: KASAN:") { return "KASAN" }
        if t.hasPrefix("BUG: KFENCE:") { return "KFENCE" }
        if t.hasPrefix("BUG: Bad page") || t.hasPrefix("BUG: Bad rss-counter") { return "Bad page" }
        if t.hasPrefix("UBSAN:") { return "UBSAN" }
        if t.hasPrefix("Oops:") || t.hasPrefix("general protection fault") || has("BUG: unable to handle") || has("BUG: kernel NULL pointer") {
            return "Oops"
        }
        if t.hasPrefix("kernel BUG at") || t.hasPrefix("BUG:") { return "BUG" }
        return nil
    }

    /// Lines kept of one report (a hung task's report lists every blocked task).
    public static let maxLines = 120

    /// The reports among these records: each from its headline (with the
    /// kernel's "cut here" line before a WARN) to the next report or the
    /// "end trace" marker, at most `maxLines` lines.
    public static func find(in records: [KernelRecord]) -> [KernelReport] {
        var out: [KernelReport] = []
        var current: KernelReport?
        func flush() {
            if let c = current { out.append(c) }
            current = nil
        }
        for (i, r) in records.enumerated() where r.fromKernel {
            if let kind = kind(of: r.text) {
                flush()
                var lines: [String] = []
                if i > 0, records[i - 1].fromKernel, records[i - 1].text.contains("[ cut here ]") { lines.append(records[i - 1].line) }
                current = KernelReport(kind: kind, headline: r.text, lines: lines + [r.line])
                continue
            }
            guard current != nil else { continue }
            if current!.lines.count < maxLines { current!.lines.append(r.line) }
            if r.text.contains("---[ end trace") { flush() }
        }
        flush()
        return out
    }
}

/// What the kernel said while one case ran (its own messages only).
public struct CaseKernelLog: Codable, Equatable, Sendable {
    /// Every kernel message of the case, as dmesg prints it.
    public var lines: [String]
    /// The reports among them (a non-empty list makes the case `kernel-warning`).
    public var reports: [KernelReport]
    /// Other case runs that ran at the same time (`--jobs`): the messages
    /// cannot say which of them the kernel was in, so each of them has them.
    public var concurrent: [String]?
    /// Records the kernel overwrote before they were read (its log buffer was full).
    public var lost: Int?

    public init(lines: [String], reports: [KernelReport], concurrent: [String]? = nil, lost: Int? = nil) {
        self.lines = lines
        self.reports = reports
        self.concurrent = concurrent
        self.lost = lost
    }

    public init(_ records: [KernelRecord], lost: Int = 0) {
        let own = records.filter(\.fromKernel)
        self.init(lines: own.map(\.line), reports: KernelReport.find(in: own), lost: lost > 0 ? lost : nil)
    }

    public var isEmpty: Bool { lines.isEmpty && (lost ?? 0) == 0 }

    /// The diagnostic lines of a case (KTAP `# kernel: ...`, the test suite's failure).
    public var text: [String] {
        var out: [String] = []
        if let c = concurrent, !c.isEmpty {
            out.append("kernel log: \(c.count) other case run(s) ran at the same time and have these lines too: \(c.joined(separator: ", "))")
        }
        if let l = lost { out.append("kernel log: \(l) record(s) overwritten before they were read (log buffer full)") }
        out += lines.map { "kernel: " + $0 }
        return out
    }
}

/// Reads `/dev/kmsg` (when this process may: root, or `dmesg_restrict` 0),
/// from where it was opened on. `drain()` returns the records written since
/// the last call. One reader per process, shared by the cases it runs
/// (`KernelLogReader.shared`), which never overlap.
public final class KernelLogReader: @unchecked Sendable {
    let fd: Int32
    /// The sequence number of the last record read.
    public private(set) var lastSeq: UInt64?
    var buffer = [UInt8](repeating: 0, count: 16384)

    /// Opens `/dev/kmsg` at its end (or at the oldest record kept): nil when it cannot be read.
    public init?(path: String = "/dev/kmsg", fromStart: Bool = false) {
        fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        if !fromStart { lseek(fd, 0, SEEK_END) }
    }

    deinit { close(fd) }

    /// The records since the last call (since the open for the first), and
    /// how many the kernel overwrote before they could be read.
    public func drain() -> (records: [KernelRecord], lost: Int) {
        var out: [KernelRecord] = []
        var lost = 0
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n < 0 {
                if errno == EINTR { continue }
                // EPIPE: records were overwritten; the next read goes on with
                // the oldest left (the gap in sequence numbers counts them).
                if errno == EPIPE { continue }
                break  // EAGAIN: nothing more
            }
            if n == 0 { break }
            guard let r = KernelRecord(buffer[0..<n]) else { continue }
            if let last = lastSeq, r.seq > last + 1 { lost += Int(r.seq - last - 1) }
            lastSeq = r.seq
            out.append(r)
        }
        return (out, lost)
    }

    /// The records from sequence number `seq` on still in the log (a
    /// fresh reader from the log's start).
    public static func records(from seq: UInt64) -> [KernelRecord] {
        guard let r = KernelLogReader(fromStart: true) else { return [] }
        return r.drain().records.filter { $0.seq >= seq }
    }

    /// This process's reader, opened at the first use; nil when `/dev/kmsg`
    /// cannot be read here (no privilege, no such device).
    public static var shared: KernelLogReader? { sharedReader.with { $0.get() } }

    private final class Lazy {
        var opened = false
        var reader: KernelLogReader?
        func get() -> KernelLogReader? {
            if !opened {
                opened = true
                // From the oldest record kept, read to the end: the sequence
                // number where the next case starts is then known.
                reader = KernelLogReader(fromStart: true)
                _ = reader?.drain()
            }
            return reader
        }
    }
    private static let sharedReader = Locked(Lazy())
}
