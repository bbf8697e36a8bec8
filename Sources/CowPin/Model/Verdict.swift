/// The outcome of one case.
public enum Verdict: Equatable, Sendable {
    /// The pin and the mapping agree: no data went astray.
    case coherent
    /// The pin and the mapping diverged; the evidence says where the data went.
    case decoherent(Evidence)
    /// The case could not run here.
    case skip(reason: String)
    /// Decoherent, as documented for a bug that is unfixed upstream.
    case xfail(reason: String, reference: String, evidence: Evidence)
    /// Coherent although upstream documents the bug as unfixed.
    case xpass(reason: String, reference: String)
    /// The harness failed; says nothing about the kernel.
    case error(String)
    /// The kernel reported a WARN, BUG, oops, bad page, lockup, stall, hung
    /// task or sanitizer report while the case ran, whatever its data check
    /// said (the reason says that, the evidence is the check's when bytes
    /// differed). The reports are the result's `kernel` log.
    case kernelWarning(reason: String, evidence: Evidence?)

    public var kind: Kind {
        switch self {
        case .coherent: return .coherent
        case .decoherent: return .decoherent
        case .skip: return .skip
        case .xfail: return .xfail
        case .xpass: return .xpass
        case .error: return .error
        case .kernelWarning: return .kernelWarning
        }
    }

    public enum Kind: String, Codable, CaseIterable, Sendable {
        case coherent, decoherent, skip, xfail, xpass, error
        case kernelWarning = "kernel-warning"
    }

    public var evidence: Evidence? {
        switch self {
        case .decoherent(let e), .xfail(_, _, let e): return e
        case .kernelWarning(_, let e): return e
        default: return nil
        }
    }

    /// The one-line reason or message for skip, xfail, xpass and error.
    public var reason: String? {
        switch self {
        case .skip(let r): return r
        case .xfail(let r, let ref, _), .xpass(let r, let ref): return "\(r) [\(ref)]"
        case .error(let m), .kernelWarning(let m, _): return m
        case .coherent, .decoherent: return nil
        }
    }
}

extension Verdict {
    /// The verdict of a case during which the kernel reported `reports`:
    /// `kernel-warning`, naming the first report and what the data check said.
    public func withKernelReports(_ reports: [KernelReport]) -> Verdict {
        guard let first = reports.first else { return self }
        if case .kernelWarning = self { return self }
        let more = reports.count > 1 ? " (and \(reports.count - 1) more report(s))" : ""
        let data: String
        switch self {
        case .coherent: data = "coherent"
        case .decoherent: data = "decoherent"
        default: data = "\(kind.rawValue): \(reason ?? "")"
        }
        return .kernelWarning(reason: "the kernel reported \(first.kind) during this case: \(first.headline)\(more); data check: \(data)",
                              evidence: evidence)
    }
}

/// What a decoherent case saw.
public struct Evidence: Codable, Equatable, Sendable {
    public var findings: [Finding] = []
    /// Page frame numbers at the case's key steps (root only).
    public var pages: [PageSnapshot] = []
    public var notes: [String] = []

    public init(findings: [Finding] = [], pages: [PageSnapshot] = [], notes: [String] = []) {
        self.findings = findings
        self.pages = pages
        self.notes = notes
    }
}

/// One view of the memory (the parent's mapping, the child's, the pin's) that
/// does not hold what it should.
public struct Finding: Codable, Equatable, Sendable {
    /// Which view was read, and how.
    public var view: String
    /// What that view should hold.
    public var expected: String
    /// What a difference here means for a driver or a process.
    public var meaning: String
    public var differingBytes: Int
    public var differingPages: Int
    public var totalRanges: Int
    /// The first differing ranges (at most `Finding.maxRanges`).
    public var ranges: [DiffRange]

    public static let maxRanges = 8

    public init(view: String, expected: String, meaning: String, differingBytes: Int, differingPages: Int,
                totalRanges: Int, ranges: [DiffRange]) {
        self.view = view
        self.expected = expected
        self.meaning = meaning
        self.differingBytes = differingBytes
        self.differingPages = differingPages
        self.totalRanges = totalRanges
        self.ranges = ranges
    }
}

/// A contiguous run of bytes that differ from what was expected.
public struct DiffRange: Codable, Equatable, Sendable {
    public var offset: Int
    public var length: Int
    public var firstPage: Int
    public var lastPage: Int
    /// The first bytes expected and seen, hex.
    public var expectedBytes: String
    public var seenBytes: String
    /// Whose data the seen bytes are, when recognisable ("original content",
    /// "the child's write (0xcc)"), else "unrecognised".
    public var seenIs: String

    public init(offset: Int, length: Int, firstPage: Int, lastPage: Int, expectedBytes: String, seenBytes: String, seenIs: String) {
        self.offset = offset
        self.length = length
        self.firstPage = firstPage
        self.lastPage = lastPage
        self.expectedBytes = expectedBytes
        self.seenBytes = seenBytes
        self.seenIs = seenIs
    }
}

/// A page's frame as a process maps it at one step of a case.
public struct PageSnapshot: Codable, Equatable, Sendable {
    public var step: String
    public var who: String
    public var page: Int
    public var pfn: UInt64?
    public var flags: [String]
    public init(step: String, who: String, page: Int, pfn: UInt64?, flags: [String]) {
        self.step = step
        self.who = who
        self.page = page
        self.pfn = pfn
        self.flags = flags
    }
}

/// Whether the kernel took or refused a pin (with which errno).
public struct PinAllowance: Codable, Sendable, Equatable, CustomStringConvertible {
    public var taken: Bool
    public var errno: String?
    public init(taken: Bool, errno: String? = nil) {
        self.taken = taken
        self.errno = errno
    }
    public var description: String { taken ? "taken" : "refused (\(errno ?? "?"))" }
}

/// A policy fact a case observed (is this pin allowed at all?), kept apart
/// from coherence: a pin taken or refused is never a decoherent verdict.
/// `cowpin matrix` compares it with upstream's rule for the release.
public struct PolicyObservation: Codable, Sendable, Equatable, CustomStringConvertible {
    /// What was asked of the kernel.
    public var action: String
    public var allowance: PinAllowance
    public init(action: String, allowance: PinAllowance) {
        self.action = action
        self.allowance = allowance
    }
    public var description: String { "\(action): \(allowance)" }
}
