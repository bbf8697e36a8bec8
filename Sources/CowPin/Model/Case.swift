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
    /// What the scenario itself needs of state all processes share.
    public let needs: SharedNeeds
    /// Reasons the case cannot run here (nil: it can).
    let requirement: @Sendable (Probe) -> String?
    let body: @Sendable (CaseContext) throws -> Void

    public init(id: String, summary: String, steps: [String], tags: [String] = [],
                backings: [Backing] = Backing.standard, knownIssue: KnownIssue? = nil, needs: SharedNeeds = .none,
                requires requirement: @escaping @Sendable (Probe) -> String? = { _ in nil },
                body: @escaping @Sendable (CaseContext) throws -> Void) {
        self.id = id
        self.summary = summary
        self.steps = steps
        self.tags = tags
        self.backings = backings
        self.knownIssue = knownIssue
        self.needs = needs
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
    public var needs: SharedNeeds { scenario.needs.merged(backing.needs) }

    /// A seed for the case's original content, stable across runs and unique to the id.
    public var seed: UInt32 {
        var h: UInt32 = 2_166_136_261
        for b in id.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return h
    }
}

/// What a case needs of the state every process on the machine shares. It
/// decides which cases `cowpin run --jobs N` runs side by side: cases that
/// need the same, none of them changing what the others see.
public struct SharedNeeds: Hashable, Sendable {
    /// A sysfs value.
    public struct Knob: Hashable, Sendable {
        public var path: String
        public var value: String
        public init(_ path: String, _ value: String) {
            self.path = path
            self.value = value
        }
    }

    /// sysfs values the case runs under, set in this order (journaled,
    /// restored): by the case itself, or for a phase by the supervisor.
    public var knobs: [Knob] = []
    /// Huge pages (KiB: count) the case may hold at once: the case grows the
    /// pool by what it lacks, or for a phase the supervisor grows it for
    /// every case that may run at the same time.
    public var hugePages: [Int: Int] = [:]
    /// The case changes state other cases would see while it runs: no case
    /// runs beside it, and it sets that state itself.
    public var alone = false
    /// The case swaps pages out: a swap device must be active (set up once per run).
    public var swap = false

    public init(knobs: [Knob] = [], hugePages: [Int: Int] = [:], alone: Bool = false, swap: Bool = false) {
        self.knobs = knobs
        self.hugePages = hugePages
        self.alone = alone
        self.swap = swap
    }

    public static let none = SharedNeeds()
    public static let alone = SharedNeeds(alone: true)
    public static let swap = SharedNeeds(swap: true)

    /// Both needs at once.
    public func merged(_ other: SharedNeeds) -> SharedNeeds {
        SharedNeeds(knobs: knobs + other.knobs.filter { !knobs.contains($0) }, hugePages: hugePages.merging(other.hugePages, uniquingKeysWith: max),
                    alone: alone || other.alone, swap: swap || other.swap)
    }
}
