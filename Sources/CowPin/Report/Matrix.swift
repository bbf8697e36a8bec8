#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What upstream history says a case family should show (data/expected-verdicts.json).
public struct ExpectedVerdicts: Codable, Sendable {
    public struct Family: Codable, Sendable {
        /// fnmatch glob over case ids.
        public var cases: String
        /// First mainline release expected coherent; nil: coherent everywhere.
        public var coherentSince: String?
        public var history: String
        public var fix: String?
        public var observed: [String: String]?
    }

    public var about: String?
    public var families: [Family]

    public static func load(_ path: String) throws -> ExpectedVerdicts {
        guard let bytes = readBytes(path) else { throw HarnessError("cannot read \(path)") }
        do {
            return try JSONDecoder().decode(ExpectedVerdicts.self, from: Data(bytes))
        } catch {
            throw HarnessError("\(path) is not a valid expected-verdict file: \(error)")
        }
    }

    public func family(of id: String) -> Family? { families.first { Selection.glob($0.cases, id) } }

    /// coherent or decoherent for this case on a kernel release, nil when unknown.
    public func expected(_ id: String, release: String) -> Verdict.Kind? {
        guard let f = family(of: id) else { return nil }
        guard let since = f.coherentSince else { return .coherent }
        guard let v = KernelVersion(release), let s = KernelVersion(since) else { return nil }
        return v >= s ? .coherent : .decoherent
    }
}

/// major.minor[.patch] of a kernel release string ("6.1.0-56-amd64", "6.18.44-foo").
public struct KernelVersion: Comparable, Sendable, CustomStringConvertible {
    public var parts: [Int]
    public init?(_ release: String) {
        let head = release.prefix { $0.isNumber || $0 == "." }
        let p = head.split(separator: ".").compactMap { Int($0) }
        guard p.count >= 2 else { return nil }
        parts = Array(p.prefix(3))
    }
    /// 6.2 == 6.2.0.
    public static func == (a: KernelVersion, b: KernelVersion) -> Bool { !(a < b) && !(b < a) }
    public static func < (a: KernelVersion, b: KernelVersion) -> Bool {
        for i in 0..<max(a.parts.count, b.parts.count) {
            let x = i < a.parts.count ? a.parts[i] : 0, y = i < b.parts.count ? b.parts[i] : 0
            if x != y { return x < y }
        }
        return false
    }
    public var description: String { parts.map(String.init).joined(separator: ".") }
}

/// Case x kernel table: what each kernel showed, against what history expects.
public struct Matrix: Codable, Sendable {
    public enum Mark: String, Codable, Sendable {
        /// As history says.
        case expected
        /// Decoherent where history says fixed.
        case regression
        /// Coherent where history says broken.
        case newlyFixed = "newly-fixed"
        /// Decoherent or coherent with no history for it.
        case unknown
        case skip, error, missing
    }

    public struct Cell: Codable, Sendable {
        public var verdict: Verdict.Kind?
        public var expected: Verdict.Kind?
        public var mark: Mark
        public var reason: String?
    }

    public struct Row: Codable, Sendable {
        public var id: String
        public var family: String?
        public var fix: String?
        public var cells: [Cell]
    }

    public struct Column: Codable, Sendable {
        public var label: String
        public var release: String
    }

    public var columns: [Column]
    public var rows: [Row]

    public init(expected: ExpectedVerdicts, runs: [(label: String, doc: JSONReporter.Document)]) {
        columns = runs.map { Column(label: $0.label, release: $0.doc.kernel.release) }
        var ids: [String] = []
        var seen = Set<String>()
        for id in Catalog.all.map(\.id) + runs.flatMap({ $0.doc.results.map(\.id) }) where !seen.contains(id) {
            if runs.contains(where: { $0.doc.results.contains { $0.id == id } }) {
                ids.append(id)
                seen.insert(id)
            }
        }
        rows = ids.map { id in
            let f = expected.family(of: id)
            let cells = runs.map { run -> Cell in
                let want = expected.expected(id, release: run.doc.kernel.release)
                guard let r = run.doc.results.last(where: { $0.id == id }) else {
                    return Cell(verdict: nil, expected: want, mark: .missing, reason: nil)
                }
                return Cell(verdict: r.verdict, expected: want, mark: Self.mark(r.verdict, want), reason: r.reason)
            }
            return Row(id: id, family: f?.cases, fix: f?.fix, cells: cells)
        }
    }

    static func mark(_ got: Verdict.Kind, _ want: Verdict.Kind?) -> Mark {
        switch got {
        case .skip: return .skip
        case .error: return .error
        case .xfail, .xpass: return .expected
        case .coherent, .decoherent:
            guard let want else { return .unknown }
            if got == want { return .expected }
            return got == .decoherent ? .regression : .newlyFixed
        }
    }

    public func count(_ m: Mark, column: Int) -> Int { rows.filter { $0.cells[column].mark == m }.count }

    public var markdown: String {
        var l: [String] = []
        l.append("| case | " + columns.map { "\($0.label) (\($0.release))" }.joined(separator: " | ") + " |")
        l.append("|---|" + columns.map { _ in "---|" }.joined())
        for r in rows {
            let cells = r.cells.map { c -> String in
                let v = c.verdict?.rawValue ?? "not run"
                switch c.mark {
                case .expected: return v
                case .regression: return "**\(v): REGRESSION**"
                case .newlyFixed: return "**\(v): newly fixed**"
                case .unknown: return "\(v) (no history)"
                case .skip, .error, .missing: return v
                }
            }
            l.append("| `\(r.id)` | " + cells.joined(separator: " | ") + " |")
        }
        l.append("")
        for (i, c) in columns.enumerated() {
            let counts = [Mark.expected, .regression, .newlyFixed, .unknown, .skip, .error, .missing]
                .map { "\($0.rawValue) \(count($0, column: i))" }.joined(separator: ", ")
            l.append("- \(c.label) (\(c.release)): \(counts)")
        }
        return l.joined(separator: "\n")
    }
}
