import ArgumentParser
import CowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct MatrixCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "matrix",
        abstract: "Tabulate `cowpin run --format json` results of several kernels against upstream history.",
        discussion: """
            Each RESULT is LABEL=FILE (or FILE, labelled by its kernel release). Against upstream history \
            (data/expected-verdicts.json) a cell is expected, a REGRESSION (decoherent where history says fixed), \
            newly fixed (coherent where history says broken), unknown (history cannot decide on that release), \
            skip, error, missing or kernel-warning (never expected). With --baseline LABEL every column is judged against that run instead, \
            no history needed: unchanged, NEWLY DECOHERENT, newly coherent. A pin taken or refused (policy) is \
            compared apart and never counts as decoherent. Exit status: 0; 1 with --check when a cell is \
            a regression, newly fixed, newly decoherent or coherent, unknown, an error or a kernel warning, when a case \
            matched by --require-ran was not run, when a kernel could not be tested (--untested), or (with \
            --check-policy) when a policy differs; 2 for bad input.
            """)

    @Option(help: ArgumentHelp("The expected-verdict file (default: the data/expected-verdicts.json built into cowpin).", valueName: "path"))
    var expected: String?

    @Option(help: ArgumentHelp("Judge every column against the run with this label (a base kernel), not against history.", valueName: "label"))
    var baseline: String?

    @Option(help: ArgumentHelp("Write a short grid (families x backing classes, one panel per kernel) here; - for standard output.", valueName: "path"))
    var summary: String?

    @Option(help: ArgumentHelp("Write the summary grid as an SVG picture here (a colour per judgment, one panel per kernel).", valueName: "path"))
    var svg: String?

    @Flag(name: .customLong("check-policy"), help: "With --check: also fail when a pin was taken or refused against the rule (or the baseline).")
    var checkPolicy = false

    @Option(help: ArgumentHelp("Write the table as Markdown here (default: standard output).", valueName: "path"))
    var markdown: String?

    @Option(help: ArgumentHelp("Write the table as JSON here.", valueName: "path"))
    var json: String?

    @Flag(help: "Fail (exit 1) on a regression, a newly fixed or unknown cell, a change against the baseline, or an error.")
    var check = false

    @Option(name: .customLong("require-ran"), help: ArgumentHelp("With --check: cases matching this glob must have run (repeatable).", valueName: "glob"))
    var requireRan: [String] = []

    @Option(help: ArgumentHelp("A kernel that could not be tested, and why (repeatable): the table says so, --check fails.",
                               valueName: "label: reason"))
    var untested: [String] = []

    @Argument(help: ArgumentHelp("Results: LABEL=FILE or FILE.", valueName: "result"))
    var results: [String] = []

    func validate() throws {
        guard !results.isEmpty || !untested.isEmpty else { throw ValidationError("give at least one result file") }
        for u in untested where Self.untestedEntry(u) == nil {
            throw ValidationError("--untested '\(u)': give 'LABEL: reason'")
        }
    }

    static func untestedEntry(_ s: String) -> Matrix.Untested? {
        let parts = s.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        let label = String(parts[0]), reason = String(parts[1].drop { $0 == " " })
        return label.isEmpty || reason.isEmpty ? nil : Matrix.Untested(label: label, reason: reason)
    }

    func run() throws {
        var runs: [(label: String, doc: JSONReporter.Document)] = []
        for r in results {
            let (label, path) = Self.split(r)
            guard !path.isEmpty else { throw ValidationError("'\(r)' names no result file: give LABEL=FILE or FILE") }
            let read: [UInt8]?
            do { read = try readBytes(path, limit: Self.maxInput) } catch { throw ValidationError("\(error)") }
            guard let bytes = read else { throw ValidationError("cannot read result file \(path)") }
            let doc: JSONReporter.Document
            do { doc = try JSONReporter.Document.decode(bytes) } catch {
                throw ValidationError("\(path) is not `cowpin run --format json` or `jsonl` output: \(error)")
            }
            if doc.complete == false {
                fputs("matrix: \(path): the run stopped after \(doc.results.count) result(s) (no totals line); its column holds what arrived\n", stderr)
            }
            runs.append((label.isEmpty ? doc.kernel.release : label, doc))
        }
        var m: Matrix
        if let baseline {
            guard runs.contains(where: { $0.label == baseline }) else {
                throw ValidationError("--baseline \(baseline) names none of the results (\(runs.map(\.label).joined(separator: ", ")))")
            }
            m = Matrix(baseline: baseline, runs: runs)
        } else {
            let history: ExpectedVerdicts
            do { history = try ExpectedVerdicts.load(path: expected) } catch { throw ValidationError("\(error)") }
            m = Matrix(expected: history, runs: runs)
        }
        m.add(untested: untested.compactMap(Self.untestedEntry))
        if let markdown { try write(m.markdown + "\n", to: markdown) } else { print(m.markdown) }
        if let json { try write(JSONReporter.encode(m) + "\n", to: json) }
        if let svg { try write(m.svg + "\n", to: svg) }
        if let summary {
            if summary == "-" { print(m.summary) } else { try write(m.summary + "\n", to: summary) }
        }
        guard check else { return }
        var failures: [String] = []
        for (i, c) in m.columns.enumerated() {
            for row in m.rows where Matrix.failing.contains(row.cells[i].mark) {
                let cell = row.cells[i]
                failures.append("\(c.label): \(row.id) is \(cell.verdict?.rawValue ?? "?") (\(cell.mark.rawValue)\(cell.because.map { "; \($0)" } ?? ""))")
            }
            for row in m.rows where row.cells[i].policyMark == .differs {
                let cell = row.cells[i]
                let line = "\(c.label): \(row.id): the pin was \(cell.policy ?? "?") where \(m.baseline == nil ? "upstream's rule says" : "the baseline had") \(cell.policyExpected ?? "?")"
                if checkPolicy { failures.append(line) } else { fputs("matrix: policy: \(line)\n", stderr) }
            }
            for g in requireRan {
                let matching = m.rows.filter { Selection.glob(g, $0.id) }
                if matching.isEmpty { failures.append("\(c.label): no result matches \(g)") }
                for row in matching where [.skip, .missing].contains(row.cells[i].mark) {
                    failures.append("\(c.label): \(row.id) did not run (\(row.cells[i].reason ?? row.cells[i].mark.rawValue))")
                }
            }
        }
        for u in m.untested ?? [] { failures.append("\(u.label) could not be tested: \(u.reason)") }
        for f in failures { fputs("matrix: \(f)\n", stderr) }
        if !failures.isEmpty { throw ExitCode(1) }
    }

    /// A result file is at most this big (a full run with evidence is a few MiB).
    static let maxInput = 256 << 20

    /// LABEL=FILE, or FILE (an absolute path, or one without `=`).
    static func split(_ argument: String) -> (label: String, path: String) {
        guard !argument.hasPrefix("/"), let eq = argument.firstIndex(of: "=") else { return ("", argument) }
        return (String(argument[..<eq]), String(argument[argument.index(after: eq)...]))
    }

    func write(_ text: String, to path: String) throws {
        guard let f = fopen(path, "w") else { throw ValidationError("cannot write \(path)") }
        fputs(text, f)
        fclose(f)
    }
}
