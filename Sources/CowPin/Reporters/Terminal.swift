import Glibc

/// For a person at a terminal: forwards every result to the run's reporter
/// (whose output stays on stdout, untouched) and keeps one progress line on
/// stderr (done/total, failures so far, elapsed), rewritten in place; at the
/// end, a recap of every case that needs a look (decoherent, error, xpass)
/// with its one-line meaning. Used only when stderr is a terminal.
public final class TerminalProgress: Reporter {
    let inner: Reporter
    let write: (String) -> Void
    var planned = 0, done = 0, failures = 0
    let start = monotonicNs()
    var recap: [String] = []
    var lastDraw: UInt64 = 0

    public init(wrapping inner: Reporter, write: @escaping (String) -> Void = { fputs($0, stderr); fflush(stderr) }) {
        self.inner = inner
        self.write = write
    }

    /// Whether stderr is a terminal (and stdout's output is not mixed into it by us).
    public static var wanted: Bool { isatty(2) == 1 }

    public func begin(planned: Int, probe: Probe) {
        self.planned = planned
        inner.begin(planned: planned, probe: probe)
    }

    public func started(_ c: Case, iteration: Int, number: Int) { inner.started(c, iteration: iteration, number: number) }

    public func finished(_ r: CaseResult, number: Int) {
        inner.finished(r, number: number)
        done += 1
        switch r.verdict {
        case .decoherent(let e):
            failures += 1
            recap.append("decoherent  \(r.id): \(e.findings.first.map { "\($0.view): \($0.meaning)" } ?? "")")
        case .error(let m):
            failures += 1
            recap.append("error       \(r.id): \(m.replacingNewlines())")
        case .kernelWarning(let m, _):
            failures += 1
            recap.append("kernel      \(r.id): \(m.replacingNewlines())")
        case .xpass(let reason, _):
            recap.append("xpass       \(r.id): coherent although documented unfixed (\(reason))")
        default: break
        }
        // At most ~10 redraws a second, and always the last one.
        let now = monotonicNs()
        if now - lastDraw > 100_000_000 || done == planned {
            lastDraw = now
            write("\r\u{1B}[K" + Self.line(done: done, planned: planned, failures: failures, elapsedNs: now - start))
        }
    }

    public func end(_ totals: Totals) {
        write("\r\u{1B}[K")
        inner.end(totals)
        var lines = ["cowpin: \(totals.total) case run(s) in \(formatSeconds(monotonicNs() - start)): \(totals.coherent) coherent, \(totals.decoherent) decoherent, \(totals.xfail) xfail, \(totals.xpass) xpass, \(totals.skip) skipped, \(totals.error) error(s)" + (totals.kernelWarning > 0 ? ", \(totals.kernelWarning) kernel warning(s)" : "")]
        if !recap.isEmpty {
            lines.append("needs a look:")
            lines += recap.map { "  " + $0 }
        }
        write(lines.joined(separator: "\n") + "\n")
    }

    static func line(done: Int, planned: Int, failures: Int, elapsedNs: UInt64) -> String {
        "cowpin: \(done)/\(planned) done, \(failures) failure(s), \(formatSeconds(elapsedNs))"
    }
}

func formatSeconds(_ ns: UInt64) -> String {
    let tenths = (ns + 50_000_000) / 100_000_000
    return "\(tenths / 10).\(tenths % 10) s"
}
