/// A scenario: a pin method, an event and the checks that follow, written
/// once and run on every backing it lists.
public struct Scenario: Sendable {
    /// "pin/event", e.g. "iouring-fixed/fork-parent-writes".
    public let id: String
    public let summary: String
    /// What the case does, step by step (for `cowpin explain` and the README).
    public let steps: [String]
    public let tags: [String]
    public let backings: [Backing]
    /// Set when upstream documents the decoherence as unfixed.
    public let knownIssue: KnownIssue?
    /// Reasons the case cannot run here (nil: it can).
    let requirement: @Sendable (Probe) -> String?
    let body: @Sendable (CaseContext) throws -> Void

    public init(id: String, summary: String, steps: [String], tags: [String] = [],
                backings: [Backing] = Backing.standard, knownIssue: KnownIssue? = nil,
                requires requirement: @escaping @Sendable (Probe) -> String? = { _ in nil },
                body: @escaping @Sendable (CaseContext) throws -> Void) {
        self.id = id
        self.summary = summary
        self.steps = steps
        self.tags = tags
        self.backings = backings
        self.knownIssue = knownIssue
        self.requirement = requirement
        self.body = body
    }
}

/// Decoherence documented upstream as unfixed: reported as XFAIL (or XPASS).
public struct KnownIssue: Sendable, Equatable {
    public var reason: String
    public var reference: String
    /// Backing ids the issue concerns (nil: all).
    public var backings: [String]?
    public init(reason: String, reference: String, backings: [String]? = nil) {
        self.reason = reason
        self.reference = reference
        self.backings = backings
    }

    public func applies(to backing: Backing) -> Bool { backings.map { $0.contains(backing.id) } ?? true }
}

/// One runnable case: a scenario on one backing.
public struct Case: Sendable, Identifiable {
    public let scenario: Scenario
    public let backing: Backing
    public init(scenario: Scenario, backing: Backing) {
        self.scenario = scenario
        self.backing = backing
    }

    public var id: String { "\(scenario.id)/\(backing.id)" }
    public var tags: [String] { scenario.tags + backing.tags }
    public var summary: String { "\(scenario.summary), on \(backing.summary)" }

    /// A seed for the case's original content, stable across runs and unique to the id.
    public var seed: UInt32 {
        var h: UInt32 = 2_166_136_261
        for b in id.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return h
    }
}
