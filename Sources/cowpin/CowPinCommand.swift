import ArgumentParser
import CowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@main
struct CowPinCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cowpin",
        abstract: "Reproduce COW / GUP-pin decoherence on the running Linux kernel.",
        discussion: """
            Exit status of `run`: 0 no decoherence, 1 decoherence found, 3 the kernel reported a WARN, BUG, \
            oops, lockup, stall or hung task during a case (kernel-warning), 2 usage or harness error, \
            4 every selected case skipped.
            """,
        version: Catalog.version,
        subcommands: [Run.self, List.self, Probe.self, Explain.self, MatrixCommand.self, Worker.self],
        defaultSubcommand: Run.self
    )

    /// ArgumentParser exits with 64 on bad input; cowpin promises 2.
    static func main() {
        // A word that is not a subcommand would be taken as `run`'s argument
        // ("Unexpected argument" with run's usage): say what it is instead.
        let args = Array(CommandLine.arguments.dropFirst())
        let all = configuration.subcommands.compactMap { $0.configuration.commandName } + ["help"]
        let commands = all.filter { $0 != Worker.configuration.commandName }
        if let word = args.first, !word.hasPrefix("-"), !all.contains(word) {
            let near = Suggest.nearest(word, among: commands)
            fputs("cowpin: unknown command '\(word)'\(near.map { "; did you mean '\($0)'?" } ?? "") (commands: \(commands.joined(separator: ", ")))\n", stderr)
            Glibc.exit(2)
        }
        do {
            var command = try parseAsRoot()
            do {
                try command.run()
            } catch let e as ValidationError {
                // Found while running (an empty selection, a file that does
                // not parse): the message alone, the arguments were well formed.
                fputs("cowpin: \(e.message)\n", stderr)
                Glibc.exit(2)
            }
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                let message = fullMessage(for: error)
                if !message.isEmpty { print(message) }
                Glibc.exit(0)
            }
            if let e = error as? ExitCode { Glibc.exit(e.rawValue) }
            fputs("cowpin: \(fullMessage(for: error))\n", stderr)
            Glibc.exit(2)
        }
    }
}

/// Shell completion (`cowpin --generate-completion-script bash|zsh|fish`) of case ids and tags.
enum Completions {
    static let caseIDs = CompletionKind.custom { _, _, prefix in Catalog.all.map(\.id).filter { $0.hasPrefix(prefix) } }
    static let tags = CompletionKind.custom { _, _, prefix in Set(Catalog.all.flatMap(\.tags)).sorted().filter { $0.hasPrefix(prefix) } }
}

struct SelectionOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Run cases whose id matches this glob (repeatable; `*` matches `/` too).", valueName: "glob"),
            completion: Completions.caseIDs)
    var filter: [String] = []

    @Option(name: .long, help: ArgumentHelp("Run cases that carry this tag (repeatable: all must match).", valueName: "tag"),
            completion: Completions.tags)
    var tag: [String] = []

    @Option(name: .long, help: ArgumentHelp("Leave out cases whose id matches this glob (repeatable).", valueName: "glob"),
            completion: Completions.caseIDs)
    var exclude: [String] = []

    @Flag(name: .long, help: "Include the cases tagged slow (1 GiB pages, about a second each), which are left out unless asked for (--slow or --tag slow).")
    var slow = false

    func cases() throws -> [Case] {
        do {
            return try Selection(filters: filter, tags: tag, excludes: exclude, includeSlow: slow).select()
        } catch let e as Selection.Unmatched {
            throw ValidationError(e.description)
        }
    }
}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case ktap, json, text
}

/// `run`'s formats: KTAP and JSON Lines stream; JSON is one document at the end.
enum RunFormat: String, ExpressibleByArgument, CaseIterable {
    case ktap, json, jsonl
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run cases and report KTAP (default) or JSON.")

    @OptionGroup var selection: SelectionOptions

    @Option(help: ArgumentHelp("Output format: ktap (streamed), jsonl (JSON Lines, streamed: a header, one object per case, totals) or json (one document at the end).", valueName: "format"))
    var format: RunFormat = .ktap

    @Option(name: .customLong("repeat"), help: ArgumentHelp("Run the selection N times.", valueName: "N"))
    var repeatCount: Int = 1

    @Option(help: ArgumentHelp("Bound for every wait inside a case, in seconds.", valueName: "seconds"))
    var timeout: Double = 10

    @Flag(help: "Report each case's duration and the total.")
    var timing = false

    @Flag(help: "No progress line and recap on a terminal's stderr.")
    var quiet = false

    @Flag(name: .customLong("dry-run"), help: "Check the arguments and the selection, print how many case runs it would make, run nothing (exit 0, or 2).")
    var dryRun = false

    @Option(help: ArgumentHelp("Run only this case and exit for `git bisect run`: 0 coherent, 1 decoherent or the kernel warned during it, 125 not testable (skip, error).", valueName: "case"),
            completion: Completions.caseIDs)
    var bisect: String?

    @Flag(name: .customLong("in-process"), help: "Run the cases in this process instead of a worker process (for debugging: a crash then ends the run).")
    var inProcess = false

    @Option(help: ArgumentHelp("Run up to N cases side by side, each in a worker process of its own (default: the number of CPUs, at most 4). Only cases that need the same global state (mTHP knobs, hugetlb pool) overlap; KSM, VFIO and 1 GiB page cases run alone. --jobs 1 runs the cases one at a time, in the selection's order.", valueName: "N"))
    var jobs: Int?

    /// One worker per CPU, at most 4.
    static var defaultJobs: Int { min(4, max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) }

    func validate() throws {
        if let jobs, !(1...64).contains(jobs) { throw ValidationError("--jobs must be between 1 and 64, got \(jobs)") }
        guard repeatCount >= 1 && repeatCount <= 100_000 else { throw ValidationError("--repeat must be between 1 and 100000, got \(repeatCount)") }
        guard timeout > 0 && timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600] seconds, got \(timeout)") }
        if bisect != nil && !(selection.filter.isEmpty && selection.tag.isEmpty && selection.exclude.isEmpty) {
            throw ValidationError("--bisect runs the one case it names: leave out --filter, --tag and --exclude")
        }
    }

    func run() throws {
        let cases: [Case]
        if let id = bisect {
            guard let c = Catalog.find(id) else { throw ValidationError("unknown case '\(id)' for --bisect (see `cowpin list`)") }
            cases = [c]
        } else {
            cases = try selection.cases()
        }
        do { _ = try FaultInjection.fromEnvironment() } catch { throw ValidationError("\(error)") }
        if dryRun {
            fputs("cowpin: would run \(cases.count * repeatCount) case run(s)\n", stderr)
            return
        }
        // Interrupted runs clean up after themselves; killed ones are cleaned up here.
        do { try Emergency.installSignalHandling() } catch { throw ValidationError("cannot start: \(error)") }
        let recovered = SystemState.recoverStale()
        if !recovered.isEmpty { fputs("cowpin: restored what a killed run left: \(recovered.joined(separator: "; "))\n", stderr) }
        FuseServer.removeStale()
        let options = RunOptions(timeoutMs: Int32(timeout * 1000), repeatCount: repeatCount)
        let out: (String) -> Void = { line in
            print(line)
            fflush(stdout)
        }
        var reporter: Reporter
        switch format {
        case .json: reporter = JSONReporter(write: out)
        case .jsonl: reporter = JSONLinesReporter(write: out)
        case .ktap: reporter = KTAPReporter(timing: timing, repeatCount: repeatCount, write: out)
        }
        // A person at a terminal gets a progress line and a recap on stderr.
        if TerminalProgress.wanted && !quiet { reporter = TerminalProgress(wrapping: reporter) }
        let start = monotonicNs()
        let totals: Totals
        if inProcess {
            totals = Runner(options: options).run(cases, reporter: reporter)
        } else {
            // A worker process runs the cases: when the kernel kills it, only its case is lost.
            let worker = ["/proc/self/exe", "worker", "--cases", WorkerSelection.ranges(cases), "--digest", WorkerSelection.digest(cases),
                          "--repeat", String(repeatCount), "--timeout", String(timeout)]
            let supervisor = Supervisor(cases: cases, options: options, jobs: jobs ?? Self.defaultJobs, command: worker)
            totals = supervisor.run(reporter: reporter)
        }
        if timing {
            let tenths = (monotonicNs() - start + 50_000) / 100_000
            let line = "total: \(tenths / 10).\(tenths % 10) ms for \(totals.total) case run(s)"
            if format == .ktap { out("# \(line)") } else { fputs(line + "\n", stderr) }
        }
        // A SIGTERM that came after the last result still means 128+signal.
        Emergency.exitIfSignalled()
        if bisect != nil {
            // The kernel warning during the case is a kernel bug the case met: bad.
            throw ExitCode(totals.decoherent > 0 || totals.xfail > 0 || totals.kernelWarning > 0 ? 1 : totals.coherent + totals.xpass > 0 ? 0 : 125)
        }
        throw ExitCode(totals.exitCode)
    }
}

/// `cowpin run`'s worker: runs the case runs its supervisor names on stdin and
/// reports each result on fd 3 (see `Supervisor`). Not for direct use.
struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "Run cases for `cowpin run` (internal).", shouldDisplay: false)

    @Option(help: "Index ranges into the catalog (\"0-20,25\").") var cases: String

    @Option(help: "The digest of the selected case ids.") var digest: String

    @Option(name: .customLong("repeat")) var repeatCount = 1

    @Option var timeout: Double = 10

    func run() throws {
        guard fcntl(WorkerChannel.fd, F_GETFD) >= 0 else { throw ValidationError("the worker is started by `cowpin run`") }
        let channel = WorkerChannel()
        do { try serve(channel) } catch {
            // Its supervisor reports why, with the cases it could not run.
            channel.fatal("\(error)")
            throw error
        }
    }

    func serve(_ channel: WorkerChannel) throws {
        _ = writeFile("/proc/self/comm", "cowpin-worker")  // its name in ps and the kernel log (exec of /proc/self/exe: "exe")
        do { try Emergency.installSignalHandling() } catch { throw ValidationError("cannot start: \(error)") }
        // A supervisor that is gone makes a message fail (EPIPE): the worker then cleans up as on SIGTERM.
        signal(SIGPIPE, SIG_IGN)
        guard let selected = WorkerSelection.cases(cases), WorkerSelection.digest(selected) == digest else {
            throw ValidationError("--cases \(cases) does not name the cases of digest \(digest) in this binary's catalog")
        }
        var options = RunOptions(timeoutMs: Int32(timeout * 1000), repeatCount: repeatCount)
        let fault: FaultInjection?
        do { fault = try FaultInjection.fromEnvironment() } catch { throw ValidationError("\(error)") }
        if let fault {
            let timeoutMs = options.timeoutMs
            options.beforeScenario = { c in if c.id == fault.caseID { fault.inject(timeoutMs: timeoutMs) } }
        }
        try Runner(options: options).serve(selected, reporter: channel, commands: 0)
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the catalog (or the selected cases).")

    @OptionGroup var selection: SelectionOptions

    @Option(help: ArgumentHelp("Output format: text or json.", valueName: "format"))
    var format: OutputFormat = .text

    @Flag(help: "Also print each case's summary and tags.")
    var verbose = false

    func validate() throws {
        guard format != .ktap else { throw ValidationError("list supports --format text or json") }
    }

    struct Entry: Codable {
        var id: String
        var summary: String
        var tags: [String]
    }

    func run() throws {
        let cases = try selection.cases()
        if format == .json {
            print(JSONReporter.encode(cases.map { Entry(id: $0.id, summary: $0.summary, tags: $0.tags) }))
            return
        }
        for c in cases {
            print(c.id)
            if verbose {
                print("    \(c.summary)")
                print("    tags: \(c.tags.joined(separator: ", "))")
            }
        }
    }
}

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "probe", abstract: "Show what the running kernel offers cowpin.")

    @Option(help: ArgumentHelp("Output format: text or json.", valueName: "format"))
    var format: OutputFormat = .text

    func validate() throws {
        guard format != .ktap else { throw ValidationError("probe supports --format text or json") }
    }

    func run() throws {
        let p = CowPin.Probe.current()
        if format == .json {
            print(JSONReporter.encode(p))
        } else {
            print(ProbeText.render(p))
        }
    }
}

struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "explain", abstract: "Explain what a case does, step by step.")

    @Argument(help: "A case id (see `cowpin list`).", completion: Completions.caseIDs)
    var caseID: String

    @Option(help: ArgumentHelp("The expected-verdict file (upstream history; default: the checkout's data/expected-verdicts.json).", valueName: "path"))
    var expected = ExpectedVerdicts.defaultPath()

    @Option(help: ArgumentHelp("Say what history expects on this kernel release (default: the running kernel's).", valueName: "release"))
    var release: String?

    func run() throws {
        guard let c = Catalog.find(caseID) else {
            throw ValidationError("unknown case '\(caseID)' (see `cowpin list`)")
        }
        print(c.id)
        print("  \(c.summary)")
        print("  tags: \(c.tags.joined(separator: ", "))")
        print("  steps:")
        print("    0. map \(c.backing.summary) and fill it with the case's own pattern")
        for (i, s) in c.scenario.steps.enumerated() { print("    \(i + 1). \(s)") }
        print("  verdicts: coherent = every view holds what it should; decoherent = a view holds another actor's data")
        print("  (the evidence names the view, the byte ranges, and whose data is there); skip = cannot run here, with the reason;")
        print("  error = the harness failed, not a finding about the kernel.")
        if let k = c.scenario.knownIssue { print("  known unfixed upstream: \(k.reason) [\(k.reference)]") }
        let history: ExpectedVerdicts
        do { history = try ExpectedVerdicts.load(expected) } catch {
            print("  upstream history: unavailable (\(error))")
            return
        }
        if let f = history.family(of: c.id) {
            print("  upstream history (\(f.cases)): \(f.history)")
            var verdict = f.initially ?? .coherent
            var line = "\(verdict.rawValue) on 5.4"
            let steps = (f.steps ?? []).compactMap { s in history.changes[s.change].map { (s, $0) } }
                .sorted { (KernelVersion($0.1.release) ?? KernelVersion("0.0")!) < (KernelVersion($1.1.release) ?? KernelVersion("0.0")!) }
            for (s, ch) in steps {
                if let b = s.becomes {
                    verdict = b
                    line += "; \(verdict.rawValue) since \(ch.release)"
                } else {
                    line += "; unknown since \(ch.release) (\(s.unknown ?? ""))"
                }
            }
            print("  timeline: \(line)")
            for (_, ch) in steps { print("  change: \(ch.citation): \(ch.mechanism)") }
            if let u = f.unknownBefore { print("  unknown before \(u): \(f.unknownWhy ?? "check the kernel")") }
            let release = self.release ?? CowPin.Probe.current().kernel.release
            switch history.expectation(c.id, release: release) {
            case .verdict(let k, let because)?: print("  expected on \(release): \(k.rawValue) (\(because))")
            case .unknown(let why)?: print("  expected on \(release): unknown (\(why))")
            case nil: break
            }
            for (kernel, seen) in (f.observed ?? [:]).sorted(by: { $0.key < $1.key }) { print("  measured on \(kernel): \(seen)") }
        }
        if let p = history.policy(of: c.id) {
            print("  policy (\(p.cases)): \(p.history)")
            let release = self.release ?? CowPin.Probe.current().kernel.release
            if let (allowance, because) = history.expectedPolicy(c.id, release: release) {
                print("  upstream's rule on \(release): the pin \(allowance) (\(because))")
            }
        }
    }
}

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
            a regression, newly fixed, newly decoherent or coherent, unknown, an error or a kernel warning, when a case matched by \
            --require-ran was not run, when a kernel could not be tested (--untested), or (with --check-policy) when \
            a policy differs; 2 for bad input.
            """)

    @Option(help: ArgumentHelp("The expected-verdict file (default: the checkout's data/expected-verdicts.json).", valueName: "path"))
    var expected = ExpectedVerdicts.defaultPath()

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
            do { history = try ExpectedVerdicts.load(expected) } catch { throw ValidationError("\(error)") }
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
