/// KTAP, streamed: one result line as each case finishes, the evidence as
/// diagnostic lines before it, and kselftest's totals line at the end. The
/// header is kselftest's own `TAP version 13`, which KTAP parsers (the
/// kernel's KUnit parser) and generic TAP parsers both accept, and the plan
/// follows it at once: a parser that reads the plan reports a run cut short
/// (a panic, a kill) as incomplete.
public final class KTAPReporter: Reporter {
    let write: (String) -> Void
    let timing: Bool
    let repeatCount: Int

    public init(timing: Bool = false, repeatCount: Int = 1, write: @escaping (String) -> Void) {
        self.write = write
        self.timing = timing
        self.repeatCount = repeatCount
    }

    public func begin(planned: Int, probe: Probe) {
        write(Self.header)
        write("1..\(planned)")
        write("# cowpin \(Catalog.version) on Linux \(probe.kernel.release) (\(probe.kernel.machine)), euid \(probe.privileges.euid)")
    }

    public static let header = "TAP version 13"

    public func finished(_ r: CaseResult, number: Int) {
        let name = repeatCount > 1 ? "\(r.id) (run \(r.iteration) of \(repeatCount))" : r.id
        for line in r.verdict.evidence.map(EvidenceText.lines) ?? r.notes { write("# \(line)") }
        for line in r.kernel?.text ?? [] { write("# \(line)") }
        if let p = r.policy { write("# policy: \(p)") }
        if timing {
            let split = r.phases.map { " (memory \(formatMs($0.memoryNs)), scenario \(formatMs($0.scenarioNs)), cleanup \(formatMs($0.cleanupNs)))" } ?? ""
            write("# time: \(formatMs(r.durationNs)) ms" + split)
        }
        write(Self.resultLine(r.verdict, number: number, name: name))
    }

    public func end(_ t: Totals) {
        // kselftest's fields; a kernel warning is counted apart, after them.
        write("# Totals: pass:\(t.coherent) fail:\(t.decoherent) xfail:\(t.xfail) xpass:\(t.xpass) skip:\(t.skip) error:\(t.error)"
              + (t.kernelWarning > 0 ? " kernel-warning:\(t.kernelWarning)" : ""))
    }

    /// The KTAP result line of one case.
    public static func resultLine(_ v: Verdict, number: Int, name: String) -> String {
        func clean(_ s: String) -> String { s.replacingNewlines() }
        switch v {
        case .coherent: return "ok \(number) \(name)"
        case .decoherent: return "not ok \(number) \(name)"
        case .skip(let reason): return "ok \(number) \(name) # SKIP \(clean(reason))"
        case .xfail(let reason, let ref, _): return "ok \(number) \(name) # XFAIL \(clean(reason)) [\(clean(ref))]"
        case .xpass(let reason, let ref): return "ok \(number) \(name) # XPASS \(clean(reason)) [\(clean(ref))]"
        case .error(let m): return "not ok \(number) \(name) # ERROR \(clean(m))"
        case .kernelWarning(let m, _): return "not ok \(number) \(name) # KERNEL-WARNING \(clean(m))"
        }
    }
}

func formatMs(_ ns: UInt64) -> String {
    let us = (ns + 500) / 1000
    let frac = us % 1000
    return "\(us / 1000).\(frac < 10 ? "00" : frac < 100 ? "0" : "")\(frac)"
}

extension String {
    func replacingNewlines() -> String {
        String(map { $0 == "\n" || $0 == "#" ? " " : $0 })
    }
}
