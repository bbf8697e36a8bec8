import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One JSON document at the end of the run: kernel, results with evidence, totals.
public final class JSONReporter: Reporter {
    /// The version of the result format (`--format json` and `jsonl`).
    public static let schema = 3

    public struct Document: Codable, Equatable {
        public var schema: Int?
        public var cowpin: String
        /// When the run started (UTC, ISO 8601).
        public var started: String?
        public var kernel: Probe.Kernel
        public var euid: UInt32
        /// What the kernel offers (THP modes, swap, VFIO, gup_test): the facts behind the skips.
        public var probe: Probe?
        public var results: [Result]
        public var totals: Totals
        public var exitCode: Int32
        /// False when the run stopped before its end (a JSON Lines stream without totals).
        public var complete: Bool?

        public init(cowpin: String, kernel: Probe.Kernel, euid: UInt32, results: [Result], totals: Totals, exitCode: Int32,
                    schema: Int? = JSONReporter.schema, started: String? = nil, probe: Probe? = nil, complete: Bool? = nil) {
            self.schema = schema
            self.cowpin = cowpin
            self.started = started
            self.kernel = kernel
            self.euid = euid
            self.probe = probe
            self.results = results
            self.totals = totals
            self.exitCode = exitCode
            self.complete = complete
        }

        /// Reads `--format json` output, or a `--format jsonl` stream (complete or cut short).
        public static func decode(_ bytes: [UInt8]) throws -> Document {
            let decoder = JSONDecoder()
            let firstLine = bytes.prefix { $0 != 10 }
            if let header = try? decoder.decode(JSONLinesReporter.Line.self, from: Data(firstLine)), header.type == "header" {
                return try JSONLinesReporter.document(bytes)
            }
            return try decoder.decode(Document.self, from: Data(bytes))
        }
    }

    public struct Result: Codable, Equatable {
        public var id: String
        public var iteration: Int
        public var verdict: Verdict.Kind
        public var reason: String?
        public var evidence: Evidence?
        public var durationMs: Double
        /// What a case without evidence recorded about the kernel ("pin taken").
        public var notes: [String]?
        /// A policy fact the case observed (a pin taken or refused).
        public var policy: PolicyObservation?
        /// What the kernel said while the case ran, and its reports.
        public var kernel: CaseKernelLog?

        public init(id: String, iteration: Int, verdict: Verdict.Kind, reason: String?, evidence: Evidence?, durationMs: Double,
                    notes: [String]? = nil, policy: PolicyObservation? = nil, kernel: CaseKernelLog? = nil) {
            self.policy = policy
            self.kernel = kernel
            self.id = id
            self.iteration = iteration
            self.verdict = verdict
            self.reason = reason
            self.evidence = evidence
            self.durationMs = durationMs
            self.notes = notes
        }
    }

    let write: (String) -> Void
    var probe: Probe?
    var started = ""
    var results: [Result] = []

    public init(write: @escaping (String) -> Void) { self.write = write }

    public func begin(planned: Int, probe: Probe) {
        self.probe = probe
        started = utcTimestamp()
    }

    public func finished(_ r: CaseResult, number: Int) {
        results.append(Result(r))
    }

    public func end(_ totals: Totals) {
        let p = probe ?? .current()
        let doc = Document(cowpin: Catalog.version, kernel: p.kernel, euid: p.privileges.euid,
                           results: results, totals: totals, exitCode: totals.exitCode, started: started, probe: p, complete: true)
        write(Self.encode(doc))
    }

    public static func encode<T: Encodable>(_ value: T, compact: Bool = false) -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = compact ? [.sortedKeys] : [.prettyPrinted, .sortedKeys]
        guard let data = try? enc.encode(value) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}

extension JSONReporter.Result {
    public init(_ r: CaseResult) {
        self.init(id: r.id, iteration: r.iteration, verdict: r.verdict.kind, reason: r.verdict.reason,
                  evidence: r.verdict.evidence, durationMs: Double(r.durationNs) / 1e6,
                  notes: r.notes.isEmpty ? nil : r.notes, policy: r.policy, kernel: r.kernel)
    }
}

/// JSON Lines, streamed: a header object (schema, start time, kernel, probe
/// facts), one object per case as it finishes, a totals object last. A run
/// that dies keeps every line written before its death; a reader sees the
/// missing totals line and knows the run was cut short.
public final class JSONLinesReporter: Reporter {
    /// One line of the stream; `type` says which fields are set.
    public struct Line: Codable {
        public var type: String
        public var schema: Int?
        public var cowpin: String?
        public var started: String?
        public var kernel: Probe.Kernel?
        public var euid: UInt32?
        public var planned: Int?
        public var probe: Probe?
        public var number: Int?
        public var result: JSONReporter.Result?
        public var totals: Totals?
        public var exitCode: Int32?

        init(type: String) { self.type = type }
    }

    let write: (String) -> Void

    public init(write: @escaping (String) -> Void) { self.write = write }

    public func begin(planned: Int, probe: Probe) {
        var l = Line(type: "header")
        l.schema = JSONReporter.schema
        l.cowpin = Catalog.version
        l.started = utcTimestamp()
        l.kernel = probe.kernel
        l.euid = probe.privileges.euid
        l.planned = planned
        l.probe = probe
        write(JSONReporter.encode(l, compact: true))
    }

    public func finished(_ r: CaseResult, number: Int) {
        var l = Line(type: "result")
        l.number = number
        l.result = JSONReporter.Result(r)
        write(JSONReporter.encode(l, compact: true))
    }

    public func end(_ totals: Totals) {
        var l = Line(type: "totals")
        l.totals = totals
        l.exitCode = totals.exitCode
        write(JSONReporter.encode(l, compact: true))
    }

    /// The document a stream describes; `complete` is false without a totals line.
    /// A last line cut in the middle (the writer died) is ignored.
    public static func document(_ bytes: [UInt8]) throws -> JSONReporter.Document {
        let decoder = JSONDecoder()
        var header: Line?
        var results: [JSONReporter.Result] = []
        var end: Line?
        let lines = bytes.split(separator: 10)
        for (i, raw) in lines.enumerated() {
            guard let l = try? decoder.decode(Line.self, from: Data(raw)) else {
                if i == lines.count - 1 { break }
                throw HarnessError("line \(i + 1) is not a cowpin JSON Lines object")
            }
            switch l.type {
            case "header": header = l
            case "result": if let r = l.result { results.append(r) }
            case "totals": end = l
            default: break
            }
        }
        guard let h = header, let kernel = h.kernel else { throw HarnessError("no header line") }
        var totals = end?.totals ?? Totals()
        if end == nil { for r in results { totals.add(r.verdict) } }
        return JSONReporter.Document(cowpin: h.cowpin ?? "?", kernel: kernel, euid: h.euid ?? 0, results: results, totals: totals,
                                     exitCode: end?.exitCode ?? totals.exitCode, schema: h.schema, started: h.started, probe: h.probe,
                                     complete: end != nil)
    }
}

/// Now, as UTC ISO 8601 ("2026-11-29T21:10:18Z").
func utcTimestamp() -> String {
    var t = time(nil)
    var tm = tm()
    gmtime_r(&t, &tm)
    var buf = [CChar](repeating: 0, count: 32)
    let n = strftime(&buf, buf.count, "%Y-%m-%dT%H:%M:%SZ", &tm)
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
