import Glibc

/// Every case cowpin knows: scenarios x the backings each lists.
public enum Catalog {
    public static let version = "0.1.0"

    public static let all: [Case] = scenarios.flatMap { s in s.backings.map { Case(scenario: s, backing: $0) } }

    public static func find(_ id: String) -> Case? { all.first { $0.id == id } }
}

/// Which cases to run: id globs (fnmatch(3), `*` also matches `/`), tags, exclusions.
public struct Selection: Sendable, Equatable {
    public var filters: [String]
    public var tags: [String]
    public var excludes: [String]
    /// Cases tagged "slow" (gigantic pages) run only when asked for: with
    /// this set, or when a selected tag is "slow".
    public var includeSlow: Bool

    public init(filters: [String] = [], tags: [String] = [], excludes: [String] = [], includeSlow: Bool = false) {
        self.filters = filters
        self.tags = tags
        self.excludes = excludes
        self.includeSlow = includeSlow
    }

    public static let slowTag = "slow"

    public struct Unmatched: Error, CustomStringConvertible {
        public var description: String
    }

    public static func glob(_ pattern: String, _ id: String) -> Bool { fnmatch(pattern, id, 0) == 0 }

    /// The selected cases, in catalog order. A filter or tag that matches no
    /// case is a usage error (a typo must not silently run nothing).
    public func select(from cases: [Case] = Catalog.all) throws -> [Case] {
        for f in filters where !cases.contains(where: { Self.glob(f, $0.id) }) {
            let hint = Suggest.forFilter(f, cases: cases).map { "; did you mean '\($0)'?" } ?? ""
            throw Unmatched(description: "no case matches filter '\(f)'\(hint) (see `cowpin list`)")
        }
        let known = tags.isEmpty ? [] : Set(cases.flatMap(\.tags))
        for t in tags where !known.contains(t) {
            let hint = Suggest.nearest(t, among: Array(known)).map { "did you mean '\($0)'? " } ?? ""
            throw Unmatched(description: "unknown tag '\(t)'; \(hint)known tags: \(known.sorted().joined(separator: ", "))")
        }
        let byFilter = cases.filter { c in filters.isEmpty || filters.contains { Self.glob($0, c.id) } }
        let byTags = byFilter.filter { c in tags.allSatisfy { c.tags.contains($0) } }
        let kept = byTags.filter { c in !excludes.contains { Self.glob($0, c.id) } }
        let selected = kept.filter { c in includeSlow || tags.contains(Self.slowTag) || !c.tags.contains(Self.slowTag) }
        guard selected.isEmpty else { return selected }
        // Nothing selected: say which condition emptied the selection.
        if byTags.isEmpty {
            throw Unmatched(description: "no case carries all of the tags \(tags.joined(separator: ", "))"
                + (filters.isEmpty ? "" : " among the cases the filters select"))
        }
        if kept.isEmpty { throw Unmatched(description: "--exclude leaves out every selected case") }
        throw Unmatched(description: "the selected cases are all tagged slow (1 GiB pages): add --slow to run them")
    }
}

/// "Did you mean": the candidate nearest to a mistyped word.
public enum Suggest {
    /// Levenshtein distance, for short words.
    static func distance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        var row = Array(0...b.count)
        for i in 1...a.count {
            var prev = row[0]
            row[0] = i
            for j in 1...max(1, b.count) where !b.isEmpty {
                let old = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
                prev = old
            }
        }
        return row[b.count]
    }

    /// The nearest candidate within a third of the word's length (at least 2 edits), if any.
    public static func nearest(_ word: String, among candidates: [String]) -> String? {
        let best = candidates.map { ($0, distance(word, $0)) }.min { $0.1 < $1.1 }
        guard let (c, d) = best, d <= max(2, word.count / 3) else { return nil }
        return c
    }

    /// For a glob that matches no case: the case id, family or event it was
    /// probably meant to be (compared path component by path component).
    public static func forFilter(_ glob: String, cases: [Case]) -> String? {
        let parts = glob.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        var fixed: [String] = []
        for (i, p) in parts.enumerated() {
            let known = Set(cases.compactMap { c -> String? in
                let comps = c.id.split(separator: "/").map(String.init)
                return i < comps.count ? comps[i] : nil
            })
            if p.contains(where: { "*?[".contains($0) }) || known.contains(p) {
                fixed.append(p)
            } else if let n = nearest(p, among: Array(known)) {
                fixed.append(n)
            } else {
                return nil
            }
        }
        let candidate = fixed.joined(separator: "/")
        guard candidate != glob, cases.contains(where: { Selection.glob(candidate, $0.id) }) else { return nil }
        return candidate
    }
}
