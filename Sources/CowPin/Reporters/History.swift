import Glibc
import CCowPin
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What upstream history says each case should show on a kernel release
/// (data/expected-verdicts.json). Every expectation is derived from the
/// upstream commits that changed the behaviour, each with its first mainline
/// release, never from what one kernel showed:
///
/// - `changes`: the commits the rules cite (id, title, first release, one line
///   of mechanism, known stable backports);
/// - `families`: for a glob of case ids, the verdict on the oldest kernel
///   cowpin supports (`initially`, 5.4) and the `steps` that changed it, each
///   naming a change; `unknownBefore` marks releases where history cannot
///   decide (a stable backport may or may not be there): those cells are
///   "unknown: check the kernel", never a confident REGRESSION;
/// - `policies`: whether a pin is allowed at all (io_uring fixed buffers in
///   file mappings), kept apart from coherence: stable kernels change policy
///   by backport, and a pin taken or refused is never a decoherent verdict.
///
/// The first family (and policy) whose glob matches a case id applies.
public struct ExpectedVerdicts: Codable, Sendable {
    /// An upstream commit that changed what a case shows.
    public struct Change: Codable, Sendable, Equatable {
        /// The commit id (12 hex digits or more).
        public var commit: String
        public var title: String
        /// The first mainline release that contains it ("5.19").
        public var release: String
        /// One line: what it changed.
        public var mechanism: String
        /// Known stable-series backports, when any.
        public var backports: String?

        public var citation: String { "\(commit) \"\(title)\" (\(release))" }
    }

    /// From `change`'s release on, the family shows `becomes`; or, with
    /// `unknown`, history cannot decide from that release on (until a later
    /// step), and `unknown` says why and what to check.
    public struct Step: Codable, Sendable, Equatable {
        public var change: String
        public var becomes: Verdict.Kind?
        public var unknown: String?
        public init(change: String, becomes: Verdict.Kind? = nil, unknown: String? = nil) {
            self.change = change
            self.becomes = becomes
            self.unknown = unknown
        }
    }

    public struct Family: Codable, Sendable {
        /// fnmatch glob over case ids.
        public var cases: String
        /// The verdict before the first step (on 5.4); default coherent.
        public var initially: Verdict.Kind?
        public var steps: [Step]?
        /// Before this release history cannot decide (backports, distribution patches).
        public var unknownBefore: String?
        /// Why, and what to check on such a kernel.
        public var unknownWhy: String?
        public var history: String
        public var observed: [String: String]?
    }

    public typealias Allowance = PinAllowance

    public struct PolicyStep: Codable, Sendable, Equatable {
        public var change: String
        public var becomes: Allowance
    }

    public struct PolicyRule: Codable, Sendable {
        public var cases: String
        public var initially: Allowance
        public var steps: [PolicyStep]?
        /// Before this release history cannot say (the policy changed by backport).
        public var unknownBefore: String?
        public var unknownWhy: String?
        public var history: String
    }

    public var schema: Int
    public var about: String?
    public var changes: [String: Change]
    public var families: [Family]
    public var policies: [PolicyRule]?

    /// The schema this build reads.
    public static let schemaVersion = 2

    /// The project's history file, found from the working directory or next
    /// to the executable (a build in .build/<config>/ of a checkout).
    public static func defaultPath() -> String {
        let relative = "data/expected-verdicts.json"
        if access(relative, R_OK) == 0 { return relative }
        if let exe = readLink("/proc/self/exe") {
            var dir = exe
            for _ in 0..<5 {
                guard let slash = dir.lastIndex(of: "/") else { break }
                dir = String(dir[..<slash])
                if access(dir + "/" + relative, R_OK) == 0 { return dir + "/" + relative }
            }
        }
        return relative
    }

    public static func load(_ path: String) throws -> ExpectedVerdicts {
        guard let bytes = try readBytes(path, limit: 16 << 20) else { throw HarnessError("cannot read \(path)") }
        return try decode(bytes, from: path)
    }

    /// The history file as it was when this binary was built (compiled in
    /// from data/expected-verdicts.json), so a copied binary needs no checkout.
    public static var embeddedBytes: [UInt8] {
        Array(UnsafeBufferPointer(start: cp_embedded_history(), count: cp_embedded_history_size()))
    }

    /// The compiled-in history file.
    public static func embedded() throws -> ExpectedVerdicts {
        try decode(embeddedBytes, from: "the built-in data/expected-verdicts.json")
    }

    /// `path`, or the compiled-in copy when nil.
    public static func load(path: String?) throws -> ExpectedVerdicts {
        try path.map { try load($0) } ?? embedded()
    }

    static func decode(_ bytes: [UInt8], from path: String) throws -> ExpectedVerdicts {
        let h: ExpectedVerdicts
        do {
            h = try JSONDecoder().decode(ExpectedVerdicts.self, from: Data(bytes))
        } catch {
            throw HarnessError("\(path) is not a valid expected-verdict file (schema \(schemaVersion)): \(error)")
        }
        guard h.schema == schemaVersion else { throw HarnessError("\(path) has schema \(h.schema); this cowpin reads \(schemaVersion)") }
        if let bad = h.problems.first { throw HarnessError("\(path): \(bad)") }
        return h
    }

    /// What is wrong with the file itself: a step naming an unknown change,
    /// a change without commit id or release.
    public var problems: [String] {
        var p: [String] = []
        for (key, c) in changes.sorted(by: { $0.key < $1.key }) {
            if c.commit.count < 12 || !c.commit.allSatisfy(\.isHexDigit) { p.append("change \(key): '\(c.commit)' is not a commit id") }
            if KernelVersion(c.release) == nil { p.append("change \(key): '\(c.release)' is not a release") }
            if c.title.isEmpty || c.mechanism.isEmpty { p.append("change \(key): title and mechanism are required") }
        }
        for f in families {
            for s in f.steps ?? [] where changes[s.change] == nil { p.append("family \(f.cases): unknown change '\(s.change)'") }
            for s in f.steps ?? [] where (s.becomes == nil) == (s.unknown == nil) {
                p.append("family \(f.cases): step '\(s.change)' needs either becomes or unknown")
            }
            if let u = f.unknownBefore, KernelVersion(u) == nil { p.append("family \(f.cases): unknownBefore '\(u)' is not a release") }
        }
        for r in policies ?? [] {
            for s in r.steps ?? [] where changes[s.change] == nil { p.append("policy \(r.cases): unknown change '\(s.change)'") }
        }
        return p
    }

    public func family(of id: String) -> Family? { families.first { Selection.glob($0.cases, id) } }
    public func policy(of id: String) -> PolicyRule? { policies?.first { Selection.glob($0.cases, id) } }

    /// What history says of a case on a release.
    public enum Expectation: Equatable, Sendable {
        /// The verdict, and the history behind it ("fixed in 5.19 by ...").
        case verdict(Verdict.Kind, because: String)
        /// History cannot decide on this release; says what to check.
        case unknown(String)

        public var kind: Verdict.Kind? {
            if case .verdict(let k, _) = self { return k }
            return nil
        }
    }

    /// The steps of a family that apply on `v`, in release order.
    func applied<S>(_ steps: [S], change: (S) -> String, on v: KernelVersion) -> [(S, Change)] {
        steps.compactMap { s in changes[change(s)].map { (s, $0) } }
            .filter { KernelVersion($0.1.release).map { $0 <= v } ?? false }
            .sorted { KernelVersion($0.1.release)! < KernelVersion($1.1.release)! }
    }

    /// nil: no family matches.
    public func expectation(_ id: String, release: String) -> Expectation? {
        guard let f = family(of: id) else { return nil }
        guard let v = KernelVersion(release) else { return .unknown("the release '\(release)' does not parse as a version") }
        if let u = f.unknownBefore, let uv = KernelVersion(u), v < uv {
            return .unknown("history cannot decide before \(u): \(f.unknownWhy ?? "check the kernel")")
        }
        let initially = f.initially ?? .coherent
        let done = applied(f.steps ?? [], change: \.change, on: v)
        guard let last = done.last else {
            let next = (f.steps ?? []).compactMap { changes[$0.change] }.first
            let why = next.map { "\(initially.rawValue) before \($0.release) (\($0.citation))" } ?? "\(initially.rawValue) on every kernel"
            return .verdict(initially, because: why)
        }
        if let u = last.0.unknown {
            return .unknown("since \(last.1.release) (\(last.1.citation)): \(u)")
        }
        let why = done.map { s, ch in "\(s.becomes?.rawValue ?? "unknown") since \(ch.release): \(ch.citation)" }.joined(separator: "; ")
        return .verdict(last.0.becomes!, because: why)
    }

    public func expected(_ id: String, release: String) -> Verdict.Kind? { expectation(id, release: release)?.kind }

    /// Whether upstream takes or refuses the pin of a case on a release; nil
    /// when no policy rule matches, the release does not parse, or history
    /// cannot say for that release.
    public func expectedPolicy(_ id: String, release: String) -> (Allowance, because: String)? {
        guard let r = policy(of: id), let v = KernelVersion(release) else { return nil }
        if let u = r.unknownBefore, let uv = KernelVersion(u), v < uv { return nil }
        let done = applied(r.steps ?? [], change: \.change, on: v)
        guard let last = done.last else { return (r.initially, "\(r.initially) before any change: \(r.history)") }
        return (last.0.becomes, "\(last.0.becomes) since \(last.1.release): \(last.1.citation)")
    }
}

func readLink(_ path: String) -> String? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buf, buf.count - 1)
    guard n > 0 else { return nil }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
