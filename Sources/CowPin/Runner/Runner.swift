import Glibc

public struct RunOptions: Sendable {
    /// Bound for every wait inside a case.
    public var timeoutMs: Int32 = 10_000
    public var repeatCount: Int = 1
    /// Called once a case's memory is ready (its knobs are set), before its
    /// scenario runs: the worker's fault injection (`COWPIN_INJECT_FAULT`).
    public var beforeScenario: (@Sendable (Case) -> Void)?
    /// Read the kernel's log around every case (when `/dev/kmsg` is readable).
    public var kernelLog: Bool
    public init(timeoutMs: Int32 = 10_000, repeatCount: Int = 1, beforeScenario: (@Sendable (Case) -> Void)? = nil, kernelLog: Bool = true) {
        self.timeoutMs = timeoutMs
        self.repeatCount = repeatCount
        self.beforeScenario = beforeScenario
        self.kernelLog = kernelLog
    }
}

/// The result of one case run.
public struct CaseResult: Sendable, Equatable {
    public var id: String
    /// 1-based repetition (with --repeat).
    public var iteration: Int
    public var verdict: Verdict
    public var durationNs: UInt64
    /// Where the time went.
    public var phases: Phases?
    /// What the case recorded about the kernel whatever the verdict (e.g.
    /// "pin taken"); a decoherent verdict's evidence carries them too.
    public var notes: [String]
    /// A policy fact the case observed (a pin taken or refused).
    public var policy: PolicyObservation?
    /// What the kernel said while the case ran (its own messages), when any.
    public var kernel: CaseKernelLog?

    public init(id: String, iteration: Int = 1, verdict: Verdict, durationNs: UInt64 = 0, phases: Phases? = nil, notes: [String] = [],
                policy: PolicyObservation? = nil, kernel: CaseKernelLog? = nil) {
        self.policy = policy
        self.kernel = kernel
        self.id = id
        self.iteration = iteration
        self.verdict = verdict
        self.durationNs = durationNs
        self.phases = phases
        self.notes = notes
    }
}

/// A case's time, split: mapping and verifying the memory (THP, hugetlb,
/// swap-out), the scenario itself (pins, forks, FUSE, DMA), and cleanup.
public struct Phases: Codable, Sendable, Equatable {
    public var memoryNs: UInt64 = 0
    public var scenarioNs: UInt64 = 0
    public var cleanupNs: UInt64 = 0

    public init(memoryNs: UInt64 = 0, scenarioNs: UInt64 = 0, cleanupNs: UInt64 = 0) {
        self.memoryNs = memoryNs
        self.scenarioNs = scenarioNs
        self.cleanupNs = cleanupNs
    }
}

public struct Totals: Codable, Sendable, Equatable {
    public var coherent = 0, decoherent = 0, skip = 0, xfail = 0, xpass = 0, error = 0, kernelWarning = 0
    public init() {}
    public var total: Int { coherent + decoherent + skip + xfail + xpass + error + kernelWarning }

    enum CodingKeys: String, CodingKey { case coherent, decoherent, skip, xfail, xpass, error, kernelWarning }

    /// Results written before `kernelWarning` existed have none.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        coherent = try c.decode(Int.self, forKey: .coherent)
        decoherent = try c.decode(Int.self, forKey: .decoherent)
        skip = try c.decode(Int.self, forKey: .skip)
        xfail = try c.decode(Int.self, forKey: .xfail)
        xpass = try c.decode(Int.self, forKey: .xpass)
        error = try c.decode(Int.self, forKey: .error)
        kernelWarning = try c.decodeIfPresent(Int.self, forKey: .kernelWarning) ?? 0
    }

    public mutating func add(_ k: Verdict.Kind) {
        switch k {
        case .coherent: coherent += 1
        case .decoherent: decoherent += 1
        case .skip: skip += 1
        case .xfail: xfail += 1
        case .xpass: xpass += 1
        case .error: error += 1
        case .kernelWarning: kernelWarning += 1
        }
    }

    /// 1 decoherence found, else 3 the kernel warned during a case, else 2
    /// harness error, else 4 all skipped, else 0.
    public var exitCode: Int32 {
        if decoherent > 0 { return 1 }
        if kernelWarning > 0 { return 3 }
        if error > 0 { return 2 }
        if total > 0 && skip == total { return 4 }
        return 0
    }
}

/// Receives results as cases finish.
public protocol Reporter: AnyObject {
    func begin(planned: Int, probe: Probe)
    /// A case starts (the worker tells its supervisor which case it is in).
    func started(_ c: Case, iteration: Int, number: Int)
    func finished(_ result: CaseResult, number: Int)
    func end(_ totals: Totals)
}

extension Reporter {
    public func started(_ c: Case, iteration: Int, number: Int) {}
}

/// Runs cases one at a time (forks must not overlap: a concurrent fork()
/// would add references to another case's pages and change what the kernel does).
public final class Runner {
    public let probe: Probe
    public let options: RunOptions
    private static let lock = Locked(())

    public init(probe: Probe = .current(), options: RunOptions = RunOptions()) {
        self.probe = probe
        self.options = options
    }

    /// Runs `body` while no case runs (for code that forks outside a case).
    public static func exclusively<T>(_ body: () throws -> T) rethrows -> T {
        try lock.with { _ in try body() }
    }

    /// Runs one case; never throws: every failure becomes a verdict. The
    /// kernel's messages from the start of the case to its end (see
    /// `openKernelWindow`) are the result's `kernel` log; a report among them
    /// makes the verdict `kernel-warning`.
    public func run(_ c: Case, iteration: Int = 1, windowOpen: Bool = false) -> CaseResult {
        let start = monotonicNs()
        var phases = Phases()
        var notes: [String] = []
        var policy: PolicyObservation?
        let (verdict, kernel) = Runner.exclusively { () -> (Verdict, CaseKernelLog?) in
            let reader = options.kernelLog ? KernelLogReader.shared : nil
            if !windowOpen { openKernelWindow() }
            let v = verdictOf(c, phases: &phases, notes: &notes, policy: &policy)
            guard let (records, lost) = reader?.drain() else { return (v, nil) }
            let log = CaseKernelLog(records, lost: lost)
            return (v.withKernelReports(log.reports), log.isEmpty ? nil : log)
        }
        return CaseResult(id: c.id, iteration: iteration, verdict: verdict, durationNs: monotonicNs() - start, phases: phases,
                          notes: verdict.evidence == nil ? notes : [], policy: policy, kernel: kernel)
    }

    /// Starts a case's kernel-log window: what the kernel said since the last
    /// case is read and left out (a report there, which no case ran under,
    /// goes to standard error). Returns the sequence number the case's
    /// records start at, when the log is readable.
    @discardableResult
    public func openKernelWindow() -> UInt64? {
        guard options.kernelLog, let reader = KernelLogReader.shared else { return nil }
        let (records, _) = reader.drain()
        for r in KernelReport.find(in: records.filter(\.fromKernel)) {
            fputs("cowpin: the kernel reported \(r.kind) between cases: \(r.headline)\n", stderr)
        }
        return reader.lastSeq.map { $0 + 1 } ?? 0
    }

    /// The verdict of one case (not serialized; `run` is).
    public func verdictOf(_ c: Case) -> Verdict {
        var phases = Phases()
        var notes: [String] = []
        var policy: PolicyObservation?
        return verdictOf(c, phases: &phases, notes: &notes, policy: &policy)
    }

    func verdictOf(_ c: Case, phases: inout Phases, notes: inout [String], policy: inout PolicyObservation?) -> Verdict {
        if let reason = c.scenario.requirement(probe) { return .skip(reason: reason) }
        let ctx = CaseContext(case: c, probe: probe, timeoutMs: options.timeoutMs)
        defer {
            notes = ctx.notes
            policy = ctx.policy
        }
        var mark = monotonicNs()
        func lap() -> UInt64 {
            let now = monotonicNs()
            defer { mark = now }
            return now - mark
        }
        defer {
            _ = lap()
            ctx.cleanup()
            phases.cleanupNs = lap()
        }
        do {
            ctx.region = try c.backing.make(ctx)
            phases.memoryNs = lap()
            options.beforeScenario?(c)
            try c.scenario.body(ctx)
            phases.scenarioNs = lap()
        } catch let s as CaseSkip {
            return .skip(reason: s.reason)
        } catch {
            let extra = ctx.findings.isEmpty ? "" : " (after \(ctx.findings.count) mismatch(es) were recorded)"
            return .error("\(error)\(extra)")
        }
        // Decoherent means bytes differed: a finding without one is a harness bug.
        if let empty = ctx.findings.first(where: { $0.differingBytes == 0 }) {
            return .error("a finding on \(empty.view) names no differing byte: a harness bug, not a verdict")
        }
        switch (ctx.findings.isEmpty, c.scenario.knownIssue.flatMap { $0.applies(to: c.backing) ? $0 : nil }) {
        case (true, nil): return .coherent
        case (false, nil): return .decoherent(ctx.evidence)
        case (true, let k?): return .xpass(reason: k.reason, reference: k.reference)
        case (false, let k?): return .xfail(reason: k.reason, reference: k.reference, evidence: ctx.evidence)
        }
    }

    /// Runs the cases (`repeatCount` times), streaming to the reporter.
    @discardableResult
    public func run(_ cases: [Case], reporter: Reporter) -> Totals {
        var totals = Totals()
        reporter.begin(planned: cases.count * options.repeatCount, probe: probe)
        var number = 0
        for iteration in 1...max(1, options.repeatCount) {
            for c in cases {
                number += 1
                Progress.shared?.note("start \(number) \(c.id)")
                let r = run(c, iteration: iteration)
                Progress.shared?.note("end \(number) \(c.id) \(r.verdict.kind.rawValue)")
                totals.add(r.verdict.kind)
                reporter.finished(r, number: number)
            }
        }
        end()
        reporter.end(totals)
        return totals
    }

    /// A worker's loop (see `Supervisor`): runs the case runs its supervisor
    /// names on `fd`, a line each ("<number> beside" or "<number> alone";
    /// numbers of the sequence that is the cases `repeatCount` times), until
    /// the end of file.
    public func serve(_ cases: [Case], reporter: Reporter, commands fd: Int32) throws {
        reporter.begin(planned: cases.count * options.repeatCount, probe: probe)
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 256)
        while true {
            guard let nl = pending.firstIndex(of: 10) else {
                let n = read(fd, &chunk, chunk.count)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                pending += chunk[0..<n]
                continue
            }
            let line = String(decoding: pending[..<nl], as: UTF8.self)
            pending.removeFirst(nl + 1)
            let f = line.split(separator: " ")
            guard f.count == 2, let number = Int(f[0]), number >= 1, number <= cases.count * options.repeatCount,
                  f[1] == "beside" || f[1] == "alone" else {
                throw HarnessError("the worker got '\(line)' from its supervisor: not '<case run> beside|alone'")
            }
            SystemState.shared.besideOthers = f[1] == "beside"
            let (c, iteration) = cases.caseRun(number)
            let firstSeq = Runner.exclusively { openKernelWindow() }
            if let channel = reporter as? WorkerChannel {
                channel.started(number: number, kernelSeq: firstSeq)
            } else {
                reporter.started(c, iteration: iteration, number: number)
            }
            Progress.shared?.note("start \(number) \(c.id)")
            let r = run(c, iteration: iteration, windowOpen: true)
            Progress.shared?.note("end \(number) \(c.id) \(r.verdict.kind.rawValue)")
            reporter.finished(r, number: number)
        }
        end()
    }

    /// Run-scoped state (a swap device, the FUSE mount) goes once the cases are done.
    private func end() {
        FuseServer.shutdownShared()
        SystemState.shared.besideOthers = false
        SystemState.shared.restore()
    }
}

extension Array where Element == Case {
    /// The case run with this 1-based number, in the sequence that is these
    /// cases `repeatCount` times, and its repetition (1-based).
    func caseRun(_ number: Int) -> (c: Case, iteration: Int) {
        (self[(number - 1) % count], (number - 1) / count + 1)
    }
}

/// Checks `done` every `everyUs` microseconds until it holds; false once
/// `boundMs` milliseconds have passed without.
func poll(boundMs: Int, everyUs: UInt32, _ done: () -> Bool) -> Bool {
    let deadline = monotonicNs() + UInt64(boundMs) * 1_000_000
    while !done() {
        if monotonicNs() > deadline { return false }
        usleep(everyUs)
    }
    return true
}

/// CLOCK_MONOTONIC in nanoseconds.
public func monotonicNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
