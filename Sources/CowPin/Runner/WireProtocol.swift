import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One line from the worker to the supervisor: its probe, a case run that
/// starts, or a result (see `WireCodec` for how it is written). Case runs are
/// numbered 1... over the whole run.
public struct WorkerMessage: Codable {
    public var probe: Probe?
    public var started: Int?
    /// With `started`: the sequence number of the case's first kernel log record.
    public var kmsg: UInt64?
    public var result: WorkerResult?
    /// The worker cannot go on (it could not start: EMFILE, EAGAIN...), and why.
    public var fatal: String?

    public init(probe: Probe? = nil, started: Int? = nil, result: WorkerResult? = nil, fatal: String? = nil) {
        self.probe = probe
        self.started = started
        self.result = result
        self.fatal = fatal
    }
}

/// A `CaseResult` on the wire.
public struct WorkerResult: Codable, Equatable {
    public var number: Int
    public var id: String
    public var iteration: Int
    public var verdict: Verdict.Kind
    public var reason: String?
    public var reference: String?
    public var evidence: Evidence?
    public var durationNs: UInt64
    public var phases: Phases?
    public var notes: [String]?
    public var policy: PolicyObservation?
    public var kernel: CaseKernelLog?

    init(number: Int, id: String, iteration: Int, verdict: Verdict.Kind, reason: String?, reference: String?, evidence: Evidence?,
         durationNs: UInt64, phases: Phases?, notes: [String]?) {
        self.number = number
        self.id = id
        self.iteration = iteration
        self.verdict = verdict
        self.reason = reason
        self.reference = reference
        self.evidence = evidence
        self.durationNs = durationNs
        self.phases = phases
        self.notes = notes
    }

    public init(_ r: CaseResult, number: Int) {
        self.number = number
        notes = r.notes.isEmpty ? nil : r.notes
        policy = r.policy
        kernel = r.kernel
        id = r.id
        iteration = r.iteration
        verdict = r.verdict.kind
        evidence = r.verdict.evidence
        durationNs = r.durationNs
        phases = r.phases
        switch r.verdict {
        case .skip(let m), .error(let m), .kernelWarning(let m, _): reason = m
        case .xfail(let m, let ref, _), .xpass(let m, let ref):
            reason = m
            reference = ref
        case .coherent, .decoherent: break
        }
    }

    public var caseResult: CaseResult {
        let v: Verdict
        switch verdict {
        case .coherent: v = .coherent
        case .decoherent: v = .decoherent(evidence ?? Evidence())
        case .skip: v = .skip(reason: reason ?? "")
        case .xfail: v = .xfail(reason: reason ?? "", reference: reference ?? "", evidence: evidence ?? Evidence())
        case .xpass: v = .xpass(reason: reason ?? "", reference: reference ?? "")
        case .error: v = .error(reason ?? "")
        case .kernelWarning: v = .kernelWarning(reason: reason ?? "", evidence: evidence)
        }
        return CaseResult(id: id, iteration: iteration, verdict: v, durationNs: durationNs, phases: phases, notes: notes ?? [], policy: policy,
                          kernel: kernel)
    }
}

/// How worker messages are written as lines (without the newline) and read back.
public protocol WorkerCodec {
    func encode(_ message: WorkerMessage) -> [UInt8]
    /// nil when the line is not a message.
    func decode(_ line: ArraySlice<UInt8>) -> WorkerMessage?
}

/// The worker pipe's codec. JSON, with a fast path for the two most common
/// messages, written and read without JSONEncoder/JSONDecoder (which would cost
/// the worker ~50 us a message): a case's start as `{"started":N}` (half the
/// lines; with the sequence number of its first kernel log record,
/// `{"started":N,"kmsg":S}`), and a result without evidence, notes, policy or
/// kernel log (most of the others)
/// as tab-separated fields.
public final class WireCodec: WorkerCodec {
    private let encoder = JSONEncoder()
    private let decoder = JSONDecoder()
    static let startedPrefix = Array("{\"started\":".utf8)

    public init() {}

    public func encode(_ m: WorkerMessage) -> [UInt8] {
        if m.probe == nil && m.result == nil && m.fatal == nil, let n = m.started {
            return Array((m.kmsg.map { "{\"started\":\(n),\"kmsg\":\($0)}" } ?? "{\"started\":\(n)}").utf8)
        }
        if m.probe == nil && m.started == nil && m.fatal == nil, let r = m.result, let line = Self.plainLine(r) {
            return Array(line.utf8)
        }
        return (try? encoder.encode(m)).map { Array($0) } ?? Array("{}".utf8)
    }

    public func decode(_ line: ArraySlice<UInt8>) -> WorkerMessage? {
        if line.starts(with: Self.startedPrefix), line.last == UInt8(ascii: "}") {
            // {"started":N} or {"started":N,"kmsg":S}
            let parts = String(decoding: line.dropFirst(Self.startedPrefix.count).dropLast(), as: UTF8.self).split(separator: ",")
            if parts.count == 1, let n = Int(parts[0]) { return WorkerMessage(started: n) }
            if parts.count == 2, let n = Int(parts[0]), parts[1].hasPrefix("\"kmsg\":"), let seq = UInt64(parts[1].dropFirst(7)) {
                var m = WorkerMessage(started: n)
                m.kmsg = seq
                return m
            }
        }
        if let r = Self.plainResult(line) { return WorkerMessage(result: r) }
        return try? decoder.decode(WorkerMessage.self, from: Data(line))
    }

    /// A result as one tab-separated line; nil when it has evidence, notes or a policy (JSON carries those).
    static func plainLine(_ w: WorkerResult) -> String? {
        guard w.evidence == nil && w.notes == nil && w.policy == nil && w.kernel == nil else { return nil }
        let phases = w.phases.map { "\($0.memoryNs),\($0.scenarioNs),\($0.cleanupNs)" } ?? ""
        return ["R", String(w.number), String(w.iteration), w.verdict.rawValue, String(w.durationNs), phases,
                escaped(w.id), w.reason.map(escaped) ?? "", w.reference.map(escaped) ?? ""].joined(separator: "\t")
    }

    /// A field of a plain result line: `\`, tab and newline escaped.
    static func escaped(_ s: String) -> String {
        guard s.contains(where: { $0 == "\\" || $0 == "\t" || $0 == "\n" }) else { return s }
        var o = ""
        for c in s {
            switch c {
            case "\\": o += "\\\\"
            case "\t": o += "\\t"
            case "\n": o += "\\n"
            default: o.append(c)
            }
        }
        return o
    }

    static func unescaped(_ s: Substring) -> String {
        guard s.contains("\\") else { return String(s) }
        var o = "", escape = false
        for c in s {
            if escape {
                o.append(c == "t" ? "\t" : c == "n" ? "\n" : c)
                escape = false
            } else if c == "\\" {
                escape = true
            } else {
                o.append(c)
            }
        }
        return o
    }

    /// A plain result line (see `plainLine`); nil when it is not one.
    static func plainResult(_ line: ArraySlice<UInt8>) -> WorkerResult? {
        guard line.starts(with: [UInt8(ascii: "R"), 9]) else { return nil }
        let f = String(decoding: line, as: UTF8.self).split(separator: "\t", omittingEmptySubsequences: false)
        guard f.count == 9, let number = Int(f[1]), let iteration = Int(f[2]), let verdict = Verdict.Kind(rawValue: String(f[3])),
              let duration = UInt64(f[4]) else { return nil }
        var phases: Phases?
        if !f[5].isEmpty {
            let p = f[5].split(separator: ",").compactMap { UInt64($0) }
            guard p.count == 3 else { return nil }
            phases = Phases(memoryNs: p[0], scenarioNs: p[1], cleanupNs: p[2])
        }
        return WorkerResult(number: number, id: unescaped(f[6]), iteration: iteration, verdict: verdict,
                            reason: f[7].isEmpty ? nil : unescaped(f[7]), reference: f[8].isEmpty ? nil : unescaped(f[8]),
                            evidence: nil, durationNs: duration, phases: phases, notes: nil)
    }
}
