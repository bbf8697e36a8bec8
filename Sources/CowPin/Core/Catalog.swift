import Glibc

/// Every case cowpin knows: scenarios x the backings each lists.
public enum Catalog {
    public static let version = "0.1.0"

    /// The long-term pin methods; each runs every long-term pin event that fits it.
    public static let pins: [PinMethod] = [
        IoUringFixedPin(), ODirectWritePin(), GupTestPin(fast: false), GupTestPin(fast: true),
        VFIOPin(writable: false), VFIOPin(writable: true),
    ]

    public static let scenarios: [Scenario] =
        PlainCOWCases.scenarios + VmspliceCases.scenarios + pins.flatMap(LongTermPinCases.scenarios(for:))
            + ODirectCases.scenarios + FileCOWCases.scenarios + FilePinningCases.scenarios

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
            throw Unmatched(description: "no case matches filter '\(f)' (see `cowpin list`)")
        }
        let known = tags.isEmpty ? [] : Set(cases.flatMap(\.tags))
        for t in tags where !known.contains(t) {
            throw Unmatched(description: "unknown tag '\(t)'; known tags: \(known.sorted().joined(separator: ", "))")
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
