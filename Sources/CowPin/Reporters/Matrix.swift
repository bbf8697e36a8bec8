#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Case x kernel table. Each cell is judged one of two ways:
/// - against upstream history (`ExpectedVerdicts`): expected, regression,
///   newly fixed, or unknown where history cannot decide;
/// - against a baseline column (`baseline:`), for a base and a patched
///   kernel: unchanged, newly decoherent, newly coherent. This needs no
///   history at all.
/// Policy facts (a pin taken or refused) are judged beside the verdict, in
/// `Cell.policyMark`, never as a regression.
public struct Matrix: Codable, Sendable {
    public enum Mark: String, Codable, Sendable, CaseIterable {
        /// As history says.
        case expected
        /// Decoherent where history says fixed.
        case regression
        /// Coherent where history says broken.
        case newlyFixed = "newly-fixed"
        /// History cannot decide on this kernel, or has no rule for the case.
        case unknown
        /// Baseline mode: the same verdict as on the baseline kernel.
        case unchanged
        /// Baseline mode: decoherent here, coherent on the baseline.
        case newlyDecoherent = "newly-decoherent"
        /// Baseline mode: coherent here, decoherent on the baseline.
        case newlyCoherent = "newly-coherent"
        case skip, error, missing
        /// The kernel reported a WARN, BUG, oops, lockup... during the case:
        /// never what history expects, whatever the data showed.
        case kernelWarning = "kernel-warning"
    }

    public enum PolicyMark: String, Codable, Sendable {
        /// As upstream's rule (or the baseline) says.
        case expected
        /// Taken where the rule says refused, or the other way round.
        case differs
        /// No rule for the case or the release.
        case unknown
    }

    public struct Cell: Codable, Sendable {
        public var verdict: Verdict.Kind?
        public var expected: Verdict.Kind?
        public var mark: Mark
        public var reason: String?
        /// History's reasoning for this release ("coherent since 5.19: ...").
        public var because: String?
        /// The policy fact the case observed, if any ("taken", "refused (EFAULT)").
        public var policy: String?
        public var policyExpected: String?
        public var policyMark: PolicyMark?

        /// Records the policy fact seen and how it compares with what was
        /// expected (upstream's rule, or the baseline's); unknown without one.
        mutating func judgePolicy(_ seen: PinAllowance, against expected: PinAllowance?) {
            policy = seen.description
            policyExpected = expected?.description
            policyMark = expected.map { $0 == seen ? .expected : .differs } ?? .unknown
        }
    }

    public struct Row: Codable, Sendable {
        public var id: String
        public var family: String?
        public var cells: [Cell]
    }

    public struct Column: Codable, Sendable {
        public var label: String
        public var release: String
        /// False when the run stopped before its end: the column holds the cases that finished.
        public var complete: Bool?
        /// Why the kernel could not be tested (to the end), when it could not.
        public var untested: String?
    }

    /// A kernel that could not be tested, and why (vm-run's last word: a
    /// boot that failed, a crash, a lockup, a timeout).
    public struct Untested: Codable, Sendable, Equatable {
        public var label: String
        public var reason: String
        public init(label: String, reason: String) {
            self.label = label
            self.reason = reason
        }
    }

    public var columns: [Column]
    public var rows: [Row]
    /// The label of the baseline column, in baseline mode.
    public var baseline: String?
    /// Kernels that could not be tested, with or without a column of what finished.
    public var untested: [Untested]?

    /// Records the kernels that could not be tested: a column of the same
    /// label says why it stops short.
    public mutating func add(untested list: [Untested]) {
        guard !list.isEmpty else { return }
        untested = (untested ?? []) + list
        for u in list {
            for i in columns.indices where columns[i].label == u.label { columns[i].untested = u.reason }
        }
    }

    public typealias Run = (label: String, doc: JSONReporter.Document)

    /// The case ids of the runs, in catalog order (unknown ids after).
    static func ids(_ runs: [Run]) -> [String] {
        var ids: [String] = []
        var seen = Set<String>()
        let ran = Set(runs.flatMap { $0.doc.results.map(\.id) })
        for id in Catalog.all.map(\.id) + runs.flatMap({ $0.doc.results.map(\.id) }) where ran.contains(id) && !seen.contains(id) {
            ids.append(id)
            seen.insert(id)
        }
        return ids
    }

    /// Each run's results by case id (the last of its iterations).
    static func byID(_ runs: [Run]) -> [[String: JSONReporter.Result]] {
        runs.map { run in Dictionary(run.doc.results.map { ($0.id, $0) }, uniquingKeysWith: { _, last in last }) }
    }

    /// Judged against upstream history.
    public init(expected history: ExpectedVerdicts, runs: [Run]) {
        columns = runs.map { Column(label: $0.label, release: $0.doc.kernel.release, complete: $0.doc.complete) }
        let results = Self.byID(runs)
        rows = Self.ids(runs).map { id in
            let cells = runs.indices.map { i -> Cell in
                let release = runs[i].doc.kernel.release
                let want = history.expectation(id, release: release)
                var cell = Cell(verdict: nil, expected: want?.kind, mark: .missing, reason: nil)
                switch want {
                case .verdict(_, let because)?: cell.because = because
                case .unknown(let why)?: cell.because = why
                case nil: cell.because = "no history for this case"
                }
                guard let r = results[i][id] else { return cell }
                cell.verdict = r.verdict
                cell.reason = r.reason
                cell.mark = Self.mark(r.verdict, want)
                if let p = r.policy {
                    let rule = history.expectedPolicy(id, release: release)
                    cell.judgePolicy(p.allowance, against: rule?.0)
                    if let rule, cell.policyMark == .differs { cell.because = "upstream's rule: \(rule.because)" }
                }
                return cell
            }
            return Row(id: id, family: history.family(of: id)?.cases, cells: cells)
        }
    }

    /// Judged against the column labelled `baseline` (which must be one of the runs).
    public init(baseline: String, runs: [Run]) {
        columns = runs.map { Column(label: $0.label, release: $0.doc.kernel.release, complete: $0.doc.complete) }
        self.baseline = baseline
        let results = Self.byID(runs)
        let base = runs.firstIndex { $0.label == baseline }.map { results[$0] } ?? [:]
        rows = Self.ids(runs).map { id in
            let b = base[id]
            let cells = runs.indices.map { i -> Cell in
                guard let r = results[i][id] else {
                    return Cell(verdict: nil, expected: b?.verdict, mark: .missing, reason: nil)
                }
                var cell = Cell(verdict: r.verdict, expected: b?.verdict, mark: Self.mark(r.verdict, baseline: b?.verdict), reason: r.reason)
                if let p = r.policy { cell.judgePolicy(p.allowance, against: b?.policy?.allowance) }
                return cell
            }
            return Row(id: id, family: nil, cells: cells)
        }
    }

    static func mark(_ got: Verdict.Kind, _ want: ExpectedVerdicts.Expectation?) -> Mark {
        switch got {
        case .skip: return .skip
        case .error: return .error
        case .kernelWarning: return .kernelWarning
        default: break
        }
        guard case .verdict(let w, _)? = want else { return .unknown }
        // XFAIL is decoherence upstream documents as unfixed, XPASS its absence.
        let broken: (Verdict.Kind) -> Bool = { $0 == .decoherent || $0 == .xfail }
        if broken(got) == broken(w) { return .expected }
        return broken(got) ? .regression : .newlyFixed
    }

    static func mark(_ got: Verdict.Kind, baseline: Verdict.Kind?) -> Mark {
        switch got {
        case .skip: return .skip
        case .error: return .error
        case .kernelWarning: return .kernelWarning
        default: break
        }
        guard let b = baseline, ![.skip, .error, .kernelWarning].contains(b) else { return .unknown }
        let broken: (Verdict.Kind) -> Bool = { $0 == .decoherent || $0 == .xfail }
        if broken(got) == broken(b) { return .unchanged }
        return broken(got) ? .newlyDecoherent : .newlyCoherent
    }

    public func count(_ m: Mark, column: Int) -> Int { rows.filter { $0.cells[column].mark == m }.count }
    public func policyDifferences(column: Int) -> Int { rows.filter { $0.cells[column].policyMark == .differs }.count }

    /// The marks a `--check` fails on.
    public static let failing: Set<Mark> = [.regression, .newlyFixed, .unknown, .newlyDecoherent, .newlyCoherent, .error, .kernelWarning]

    public var markdown: String {
        var l: [String] = []
        if let baseline { l.append("Judged against the baseline kernel `\(baseline)`.\n") }
        l.append("| case | " + columns.map { "\($0.label) (\($0.release))" }.joined(separator: " | ") + " |")
        l.append("|---|" + columns.map { _ in "---|" }.joined())
        for r in rows {
            let cells = r.cells.map { c -> String in
                var v = c.verdict?.rawValue ?? "not run"
                switch c.mark {
                case .expected, .unchanged, .skip, .error, .missing: break
                case .regression: v = "**\(v): REGRESSION**"
                case .newlyFixed: v = "**\(v): newly fixed**"
                case .newlyDecoherent: v = "**\(v): NEWLY DECOHERENT**"
                case .newlyCoherent: v = "**\(v): newly coherent**"
                case .unknown: v = "\(v) (unknown: \(c.because ?? "no baseline verdict"))"
                case .kernelWarning: v = "**KERNEL WARNING**: \(c.reason.map { $0.replacingNewlines() } ?? "")"
                }
                if let p = c.policy {
                    v += c.policyMark == .differs ? "; pin **\(p), rule says \(c.policyExpected ?? "?")**" : "; pin \(p)"
                }
                return v
            }
            l.append("| `\(r.id)` | " + cells.joined(separator: " | ") + " |")
        }
        l.append("")
        let marks: [Mark] = baseline == nil
            ? [.expected, .regression, .newlyFixed, .unknown, .skip, .error, .missing, .kernelWarning]
            : [.unchanged, .newlyDecoherent, .newlyCoherent, .unknown, .skip, .error, .missing, .kernelWarning]
        for (i, c) in columns.enumerated() {
            let counts = marks.map { "\($0.rawValue) \(count($0, column: i))" } + ["policy differs \(policyDifferences(column: i))"]
            l.append("- \(c.label) (\(c.release)): \(counts.joined(separator: ", "))")
            if c.complete == false || c.untested != nil {
                let held = rows.filter { $0.cells[i].mark != .missing }.count
                l.append("  - **not tested to the end**: \(c.untested ?? "the run stopped before its end") (the column holds the \(held) case(s) that finished)")
            }
        }
        let columnless = (untested ?? []).filter { u in !columns.contains { $0.label == u.label } }
        if !columnless.isEmpty {
            l.append("")
            l.append("Kernels that could not be tested (no column):")
            for u in columnless { l.append("- **\(u.label)**: \(u.reason)") }
        }
        return l.joined(separator: "\n")
    }
}

/// The kind of memory a case's backing is, for the summary grid: the classes
/// upstream's fixes are specific to.
public enum BackingClass: String, CaseIterable, Codable, Sendable {
    case base, thpPMD = "thp-pmd", thpPTE = "thp-pte", mthp, swapped, hugetlb, ksm, zeropage, pagecache

    /// The class of a case id's backing (its last path component).
    public static func of(_ caseID: String) -> BackingClass {
        let b = caseID.split(separator: "/").last.map(String.init) ?? caseID
        if b.hasSuffix("-swapped") { return .swapped }
        if b.contains("hugetlb") && !b.hasSuffix("-private") && !caseID.hasPrefix("longterm-file/") { return .hugetlb }
        if b == "ksm-page" { return .ksm }
        if b.contains("zeropage") || b == "anon-unpopulated" { return .zeropage }
        if ["memfd", "tmpfs", "ext4"].contains(where: { b.hasPrefix($0) }) { return .pagecache }
        if b == "thp-pmd" { return .thpPMD }
        if b.hasPrefix("mthp-") { return .mthp }
        if b.hasPrefix("thp-") { return .thpPTE }
        return .base
    }
}

extension Matrix {
    /// The families (first component of the case ids), in row order.
    var families: [String] {
        rows.reduce(into: [String]()) { list, r in
            let f = String(r.id.split(separator: "/").first ?? "")
            if !list.contains(f) { list.append(f) }
        }
    }

    /// The cells of one kernel column for a family and a backing class.
    func cells(family f: String, _ cls: BackingClass, column i: Int) -> [Cell] {
        rows.filter { $0.id.hasPrefix(f + "/") && BackingClass.of($0.id) == cls }.map { $0.cells[i] }
    }

    /// Families (the first component of a case id) x backing classes, one panel
    /// per kernel: in each cell the number of cases as judged, and the marks that
    /// need a look (R regression, F newly fixed, N newly decoherent, C newly
    /// coherent, U unknown, E error); "-" where nothing ran. Short enough for a mail.
    public var summary: String {
        let classes = BackingClass.allCases
        let letters: [(Mark, String)] = [(.regression, "R"), (.newlyFixed, "F"), (.newlyDecoherent, "N"), (.newlyCoherent, "C"),
                                         (.unknown, "U"), (.error, "E"), (.kernelWarning, "K")]
        let width = max(14, (families.map(\.count).max() ?? 0) + 1)
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        var out: [String] = []
        for (i, column) in columns.enumerated() {
            out.append("\(column.label) (\(column.release))\(baseline.map { ", against \($0)" } ?? ", against upstream history")")
            out.append(pad("", width) + classes.map { pad($0.rawValue, 10) }.joined().trimmingTrailingSpaces)
            for f in families {
                var line = pad(f, width)
                for cls in classes {
                    let cells = cells(family: f, cls, column: i)
                    let judged = cells.filter { ![.skip, .missing].contains($0.mark) }
                    guard !judged.isEmpty else {
                        line += pad(cells.isEmpty ? "" : "-", 10)
                        continue
                    }
                    let fine = judged.filter { $0.mark == .expected || $0.mark == .unchanged }.count
                    let broken = judged.filter { ($0.mark == .expected || $0.mark == .unchanged) && ($0.verdict == .decoherent || $0.verdict == .xfail) }.count
                    var text = broken > 0 ? "\(fine)(\(broken)d)" : "\(fine)"
                    for (m, l) in letters {
                        let n = judged.filter { $0.mark == m }.count
                        if n > 0 { text += " \(n)\(l)" }
                    }
                    line += pad(text, 10)
                }
                out.append(line.trimmingTrailingSpaces)
            }
            out.append("")
        }
        out.append("Each cell: cases as \(baseline == nil ? "history expects" : "on the baseline") (of them d decoherent or xfail); R regression, F newly fixed, N newly decoherent, C newly coherent, U unknown, E error, K kernel warning; - nothing ran.")
        return out.joined(separator: "\n")
    }
}

extension String {
    var trimmingTrailingSpaces: String { String(reversed().drop { $0 == " " }.reversed()) }
}

extension Matrix {
    /// The summary grid as a picture for dashboards: one panel per kernel,
    /// families x backing classes, each cell coloured by the judgment that
    /// needs the most attention there, with its counts.
    public var svg: String {
        let classes = BackingClass.allCases
        let cellW = 74, cellH = 22, labelW = 150, headH = 44, gap = 28
        let panelH = headH + families.count * cellH
        let legendH = 74
        let width = labelW + classes.count * cellW + 20
        let height = columns.count * (panelH + gap) + legendH
        func esc(_ s: String) -> String {
            s.replacingAll("&", "&amp;").replacingAll("<", "&lt;").replacingAll(">", "&gt;")
        }
        // Colour per judgment, most attention first.
        let palette: [(String, String, (Cell) -> Bool)] = [
            ("kernel warning", "#7f0000", { $0.mark == .kernelWarning }),
            ("regression / newly decoherent", "#d73027", { $0.mark == .regression || $0.mark == .newlyDecoherent }),
            ("error", "#4d4d4d", { $0.mark == .error }),
            ("newly fixed / newly coherent", "#4575b4", { $0.mark == .newlyFixed || $0.mark == .newlyCoherent }),
            ("unknown", "#b15bd6", { $0.mark == .unknown }),
            ("decoherent, as expected", "#fdae61", { ($0.mark == .expected || $0.mark == .unchanged) && ($0.verdict == .decoherent || $0.verdict == .xfail) }),
            ("coherent, as expected", "#66bd63", { $0.mark == .expected || $0.mark == .unchanged }),
            ("skipped", "#e0e0e0", { $0.mark == .skip || $0.mark == .missing }),
        ]
        var o = ["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\" font-family=\"DejaVu Sans, sans-serif\" font-size=\"11\">",
                 "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"]
        for (i, column) in columns.enumerated() {
            let y0 = i * (panelH + gap) + 10
            let title = "\(column.label) (\(column.release))" + (baseline.map { ", against \($0)" } ?? ", against upstream history")
            o.append("<text x=\"10\" y=\"\(y0 + 14)\" font-size=\"13\" font-weight=\"bold\">\(esc(title))</text>")
            for (c, cls) in classes.enumerated() {
                o.append("<text x=\"\(labelW + c * cellW + cellW / 2)\" y=\"\(y0 + headH - 8)\" text-anchor=\"middle\">\(cls.rawValue)</text>")
            }
            for (r, f) in families.enumerated() {
                let y = y0 + headH + r * cellH
                o.append("<text x=\"10\" y=\"\(y + 15)\">\(esc(f))</text>")
                for (c, cls) in classes.enumerated() {
                    let cells = cells(family: f, cls, column: i)
                    guard !cells.isEmpty else { continue }
                    let colour = palette.first { p in cells.contains(where: p.2) }?.1 ?? "#ffffff"
                    let judged = cells.filter { ![.skip, .missing].contains($0.mark) }.count
                    let flagged = cells.filter { Matrix.failing.contains($0.mark) }.count
                    let label = judged == 0 ? "-" : flagged > 0 ? "\(flagged)/\(judged)" : "\(judged)"
                    let x = labelW + c * cellW
                    o.append("<rect x=\"\(x + 1)\" y=\"\(y + 1)\" width=\"\(cellW - 2)\" height=\"\(cellH - 2)\" fill=\"\(colour)\" stroke=\"#ffffff\"/>")
                    o.append("<text x=\"\(x + cellW / 2)\" y=\"\(y + 15)\" text-anchor=\"middle\" fill=\"\(colour == "#4d4d4d" || colour == "#d73027" || colour == "#7f0000" || colour == "#4575b4" ? "white" : "black")\">\(label)</text>")
                }
            }
        }
        let ly = columns.count * (panelH + gap) + 10
        for (k, p) in palette.enumerated() {
            let x = 10 + (k % 4) * 190, y = ly + (k / 4) * 22
            o.append("<rect x=\"\(x)\" y=\"\(y)\" width=\"14\" height=\"14\" fill=\"\(p.1)\"/>")
            o.append("<text x=\"\(x + 20)\" y=\"\(y + 11)\">\(esc(p.0))</text>")
        }
        o.append("<text x=\"10\" y=\"\(ly + 52)\" fill=\"#555555\">cell: cases judged (flagged/judged where some need a look); colour: the judgment that needs the most attention</text>")
        o.append("</svg>")
        return o.joined(separator: "\n")
    }
}

extension String {
    func replacingAll(_ a: String, _ b: String) -> String { split(separator: a, omittingEmptySubsequences: false).joined(separator: b) }
}
