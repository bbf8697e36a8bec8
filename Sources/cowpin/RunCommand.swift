import ArgumentParser
import CowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

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

    @Flag(name: .customLong("dry-run"), help: "Check the arguments and the selection, print the selected case ids and how many case runs it would make, run nothing (exit 0, or 2).")
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
            // The ids on stdout: scripts/vm-run gives the guest only what they need.
            for c in cases { print(c.id) }
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
