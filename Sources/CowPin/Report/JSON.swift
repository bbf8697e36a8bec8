#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One JSON document at the end of the run: kernel, results with evidence, totals.
public final class JSONReporter: Reporter {
    public struct Document: Codable, Equatable {
        public var cowpin: String
        public var kernel: Probe.Kernel
        public var euid: UInt32
        public var results: [Result]
        public var totals: Totals
        public var exitCode: Int32

        public init(cowpin: String, kernel: Probe.Kernel, euid: UInt32, results: [Result], totals: Totals, exitCode: Int32) {
            self.cowpin = cowpin
            self.kernel = kernel
            self.euid = euid
            self.results = results
            self.totals = totals
            self.exitCode = exitCode
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

        public init(id: String, iteration: Int, verdict: Verdict.Kind, reason: String?, evidence: Evidence?, durationMs: Double,
                    notes: [String]? = nil, policy: PolicyObservation? = nil) {
            self.policy = policy
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
    var results: [Result] = []

    public init(write: @escaping (String) -> Void) { self.write = write }

    public func begin(planned: Int, probe: Probe) { self.probe = probe }

    public func finished(_ r: CaseResult, number: Int) {
        results.append(Result(id: r.id, iteration: r.iteration, verdict: r.verdict.kind, reason: r.verdict.reason,
                              evidence: r.verdict.evidence, durationMs: Double(r.durationNs) / 1e6,
                              notes: r.notes.isEmpty ? nil : r.notes, policy: r.policy))
    }

    public func end(_ totals: Totals) {
        let p = probe ?? .current()
        let doc = Document(cowpin: Catalog.version, kernel: p.kernel, euid: p.privileges.euid,
                           results: results, totals: totals, exitCode: totals.exitCode)
        write(Self.encode(doc))
    }

    public static func encode<T: Encodable>(_ value: T) -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? enc.encode(value) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}
