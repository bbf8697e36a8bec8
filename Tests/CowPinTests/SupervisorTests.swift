import CowPin
import Foundation
import Testing

/// `cowpin run` runs the cases in a worker process: a worker the kernel kills
/// in the middle of a case costs that case (an `error` naming the signal),
/// what it changed is restored, and a new worker runs the rest.
@Suite(.serialized)
struct SupervisorTests {
    /// Three cases in catalog order; the middle one sets an mTHP knob.
    static let ids = ["cow/fork-parent-writes/anon-page", "cow/fork-parent-writes/mthp-64k", "cow/fork-parent-writes-mprotect/anon-page"]
    static let knob = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled"

    static var selection: [String] { ids.flatMap { ["--filter", $0] } }

    /// The knob's value, read under cowpin's cross-process lock: no case of
    /// another run (tests run in parallel) has it changed meanwhile, and
    /// what a dead one left is restored first. No case of this process
    /// runs meanwhile either (the lock is per process).
    static func knobValue() -> String? {
        Runner.exclusively { try? SystemState.shared.withLock { StateTests.shown(knob) } }
    }

    /// Root and the 64 KiB mTHP knob: the middle case then changes the knob, and crashes.
    static func knobIfRoot() -> String? {
        guard Probe.isRoot, let value = knobValue() else {
            recordSkip("needs root and \(knob) (the crashing case must change a knob)")
            return nil
        }
        return value
    }

    /// Runs cowpin with `COWPIN_INJECT_FAULT` set for it alone (not for tests running in parallel).
    static func run(injecting fault: String, _ args: [String]) throws -> CLITests.Output {
        try CLITests.run(args, via: ["/usr/bin/env", "COWPIN_INJECT_FAULT=\(fault)"])
    }

    static func totals(of results: [String]) -> Totals {
        var t = Totals()
        for r in results {
            t.add(r.contains(" # SKIP ") ? .skip : r.contains(" # ERROR ") ? .error : r.contains(" # XFAIL ") ? .xfail
                  : r.contains(" # XPASS ") ? .xpass : r.hasPrefix("not ok ") ? .decoherent : .coherent)
        }
        return t
    }

    @Test("a worker killed mid-case: that case is an error naming the signal, its knob is restored, the run goes on",
          arguments: [("sigbus", "SIGBUS (signal 7)"), ("sigsegv", "SIGSEGV (signal 11)"), ("sigkill", "SIGKILL (signal 9)")])
    func crashInMiddleCase(_ fault: String, _ signal: String) throws {
        guard let before = Self.knobIfRoot() else { return }
        // One job: the worker sets the knob itself, so its journal must bring it back.
        let o = try Self.run(injecting: "\(Self.ids[1]):\(fault)", ["run", "--jobs", "1"] + Self.selection)
        let (results, totals) = CLITests.checkKTAP(o.stdout)
        try #require(results.count == 3, "stdout: \(o.stdout)\nstderr: \(o.stderr)")
        #expect(results[0].hasPrefix("ok 1 \(Self.ids[0])"))
        #expect(results[1].hasPrefix("not ok 2 \(Self.ids[1]) # ERROR the cowpin worker was killed by \(signal) during this case"),
                "\(results[1])")
        #expect(results[2].hasPrefix("ok 3 \(Self.ids[2])"))
        #expect(totals?.hasSuffix(" error:1") == true, "\(totals ?? "no totals")")
        let t = Self.totals(of: results)
        #expect(t.error == 1)
        #expect(totals == "# Totals: pass:\(t.coherent) fail:\(t.decoherent) xfail:\(t.xfail) xpass:\(t.xpass) skip:\(t.skip) error:\(t.error)")
        #expect(o.status == t.exitCode && o.status == 2, "exit \(o.status)")
        // The worker had set the knob for its case: the supervisor restored it from the worker's journal.
        #expect(Self.knobValue() == before)
        if before != "madvise" {
            // Another cowpin process (tests run in parallel) may take the lock
            // first and restore the dead worker's journal itself: then the
            // message is in its output, and the journal must be gone.
            let pid = o.stderr.split(separator: "(pid ").dropFirst().first.flatMap { Int($0.prefix { $0.isNumber }) }
            let journalLeft = pid.map { access("\(SystemState.directory)/journal-\($0)", F_OK) == 0 } ?? true
            #expect(o.stderr.contains("restored what it left: \(Self.knob) = \(before)") || !journalLeft, "stderr: \(o.stderr)")
        }
        #expect(o.stderr.contains("cowpin: the worker (pid "), "stderr: \(o.stderr)")
    }

    @Test("--format json still parses and carries the worker's crash as the case's error")
    func jsonCarriesTheCrash() throws {
        guard let before = Self.knobIfRoot() else { return }
        let o = try Self.run(injecting: "\(Self.ids[1]):sigsegv", ["run", "--format", "json"] + Self.selection)
        let doc = try JSONDecoder().decode(JSONReporter.Document.self, from: Data(o.stdout.utf8))
        try #require(doc.results.count == 3)
        #expect(doc.results.map(\.id) == Self.ids)
        #expect(doc.results[1].verdict == .error)
        #expect(doc.results[1].reason == "the cowpin worker was killed by SIGSEGV (signal 11) during this case")
        #expect(doc.results[0].verdict != .error && doc.results[2].verdict != .error)
        #expect(doc.totals.error == 1)
        #expect(doc.exitCode == doc.totals.exitCode && doc.exitCode == o.status)
        #expect(Self.knobValue() == before)
    }

    @Test("workers that die 3 times in a row end the run: the rest is reported as error")
    func boundedRespawns() throws {
        guard Self.knobIfRoot() != nil else { return }
        let o = try Self.run(injecting: "\(Self.ids[1]):sigkill", ["run", "--jobs", "1", "--filter", Self.ids[1], "--repeat", "5"])
        let (results, totals) = CLITests.checkKTAP(o.stdout)
        try #require(results.count == 5, "stdout: \(o.stdout)")
        for (i, r) in results.prefix(3).enumerated() {
            #expect(r.hasPrefix("not ok \(i + 1) \(Self.ids[1]) (run \(i + 1) of 5) # ERROR the cowpin worker was killed by SIGKILL"), "\(r)")
        }
        for r in results.suffix(2) {
            #expect(r.contains("# ERROR not run: the cowpin worker died 3 times in a row without finishing a case"), "\(r)")
        }
        #expect(totals == "# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:5")
        #expect(o.status == 2)
    }

    @Test("--bisect: a worker crash is not testable (125)")
    func bisectCrashIs125() throws {
        guard Self.knobIfRoot() != nil else { return }
        let o = try Self.run(injecting: "\(Self.ids[1]):sigbus", ["run", "--bisect", Self.ids[1]])
        #expect(o.status == 125, "stdout: \(o.stdout)")
    }

    @Test("a malformed COWPIN_INJECT_FAULT is a usage error")
    func badInjection() throws {
        let o = try Self.run(injecting: "nonsense", ["run", "--filter", Self.ids[0]])
        #expect(o.status == 2)
        #expect(o.stderr.contains("COWPIN_INJECT_FAULT must be <case-id>:<sigbus|sigsegv|sigkill|hang|lkdtm=TYPE>"))
    }

    @Test("--in-process runs the cases without a worker, with the same output")
    func inProcess() throws {
        let a = try CLITests.cowpin("run", "--filter", Self.ids[0], "--filter", Self.ids[2])
        let b = try CLITests.cowpin("run", "--in-process", "--filter", Self.ids[0], "--filter", Self.ids[2])
        #expect(a.status == b.status)
        #expect(a.stdout == b.stdout)
    }

    static func children(of pid: pid_t) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(Int32.init).filter { p in
            ((try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8)) ?? "")
                .split(separator: ")").last?.split(separator: " ").dropFirst(1).first == "\(pid)"
        }
    }

    @Test("SIGTERM to cowpin run reaches the worker: it cleans up, and the run exits 143")
    func sigtermForwarded() throws {
        guard Probe.isRoot else {
            recordSkip("needs root")
            return
        }
        let knobBefore = Self.knobValue()
        var pid: pid_t = 0
        let args: [String] = [CLITests.binary.path, "run", "--jobs", "2", "--filter", "odirect*", "--filter", "*mthp-64k", "--repeat", "10"]
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let errPath = "/tmp/cowpin-supervisor-test-\(getpid()).err"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(posix_spawn(&pid, CLITests.binary.path, &actions, nil, argv, environ) == 0)
        posix_spawn_file_actions_destroy(&actions)
        defer { unlink(errPath) }
        // The hold point: both workers run, and each has mounted its FUSE
        // server (an O_DIRECT case ran or runs in it), so the signal finds
        // something to clean up in each. Where the 64 KiB mTHP knob exists,
        // the supervisor has set it for the phase those cases run in; where
        // it does not (before 6.8), the mTHP cases skip one at a time first
        // (26 case runs a repetition; with 100 repetitions the hold came
        // 53 s after the start under QEMU TCG) and the O_DIRECT cases of the
        // next phase run side by side. Ten repetitions leave 1750 O_DIRECT
        // case runs after the hold.
        let fuse = FuseTests.usable == nil
        var workers: [pid_t] = []
        let held = waitUntil(seconds: 120) {
            workers = Self.children(of: pid)
            return workers.count == 2 && (!fuse || workers.allSatisfy { w in FuseTests.cowpinMounts.contains { $0.hasPrefix("/tmp/cowpin-fuse-\(w)-") } })
        }
        kill(pid, SIGTERM)
        let st = reap(pid, seconds: 60)
        #expect(held, "the run's workers: \(workers) (each with a FUSE mount: \(fuse))")
        #expect(st.map { $0 & 0x7f == 0 && ($0 >> 8) & 0xff == 143 } == true, "wait status \(st.map(String.init) ?? "none: killed after 60 s")")
        let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        #expect(err.contains("cowpin: interrupted by SIGTERM"), "stderr: \(err)")
        #expect(workers.count == 2, "the run's workers: \(workers)")
        for w in workers {
            #expect(kill(w, 0) != 0, "worker \(w) is gone")
            #expect(!FileManager.default.fileExists(atPath: SystemState.directory + "/journal-\(w)"))
            #expect(!FuseTests.cowpinMounts.contains { $0.hasPrefix("/tmp/cowpin-fuse-\(w)-") })
            #expect(Self.children(of: w).isEmpty)
        }
        // The mTHP knob the cases set is back (read under the lock: runs in parallel set it too).
        #expect(Self.knobValue() == knobBefore)
    }
}

/// `--jobs N`: cases that need the same knobs run side by side, each in a
/// worker of its own; the results, the verdicts and the knobs afterwards are
/// those of a run with one job.
@Suite(.serialized)
struct ParallelTests {
    static func ids(_ o: CLITests.Output) -> [String] {
        CLITests.checkKTAP(o.stdout).results
    }

    @Test("phases: one job runs everything in order; several group the cases by what they need, and the alone ones apart")
    func phases() throws {
        let ids = ["cow/fork-parent-writes/anon-page", "cow/fork-parent-writes/mthp-64k", "cow/fork-parent-writes/hugetlb-2048k",
                   "cow/fork-parent-writes/thp-pmd", "cow/fork-parent-writes/mthp-64k-swapped", "cow/fork-parent-writes/mthp-16k",
                   "cow/fork-parent-writes/ksm-page", "cow/fork-parent-writes/hugetlb-1048576k"]
        let cases = try ids.map { try #require(Catalog.find($0), "\($0)") }
        let knob = { (kb: Int) in SharedNeeds(knobs: [.init("/sys/kernel/mm/transparent_hugepage/hugepages-\(kb)kB/enabled", "madvise")]) }
        let one = Supervisor(cases: cases, options: RunOptions(repeatCount: 2), jobs: 1, command: [])
        #expect(one.phases() == [Supervisor.Phase(needs: nil, numbers: Array(1...16))])
        let two = Supervisor(cases: cases, options: RunOptions(repeatCount: 2), jobs: 2, command: [])
        let phases = two.phases()
        #expect(phases.map(\.numbers) == [[1, 4, 9, 12], [2, 5, 10, 13], [3, 11], [6, 14], [7, 8, 15, 16]])
        #expect(phases.map(\.needs) == [SharedNeeds.none, knob(64), SharedNeeds(hugePages: [2048: 4]), knob(16), nil])
        #expect(cases[6].needs.knobs.last == .init("/sys/kernel/mm/ksm/run", "1"), "ksmd starts once its other knobs are set")
        #expect(cases[4].needs.swap && !cases[1].needs.swap)
    }

    @Test("a VFIO group opens in one process at a time (EBUSY otherwise): the VFIO cases run alone")
    func vfioAlone() {
        let vfio = Catalog.all.filter { $0.tags.contains("vfio-ro") || $0.tags.contains("vfio-rw") }
        #expect(vfio.count > 50)
        #expect(vfio.allSatisfy { $0.needs.alone })
        #expect(!Catalog.all.filter { $0.id.hasPrefix("iouring-fixed/fork-parent-writes/") }.contains { $0.needs.alone && !$0.tags.contains("hugetlb") && !$0.tags.contains("ksm") })
    }

    @Test("gup_test holds one long-term pin for the whole debugfs file: the gup_test cases run alone")
    func gupTestAlone() {
        let gup = Catalog.all.filter { $0.id.hasPrefix("gup-test-ro") }
        #expect(gup.count > 100)
        #expect(gup.allSatisfy { $0.needs.alone })
    }

    @Test("--jobs 2 gives the verdicts, order and output of --jobs 1, and leaves the knobs as they were")
    func sameAsOneJob() throws {
        let before = SupervisorTests.knobValue()
        let selection = ["--filter", "cow/fork-parent-writes/*", "--filter", "iouring-fixed/pin-shared-parent-writes/*"]
        let one = try CLITests.run(["run", "--jobs", "1"] + selection)
        let two = try CLITests.run(["run", "--jobs", "2"] + selection)
        #expect(one.status == two.status && [0, 4].contains(two.status), "\(two.stderr)")
        #expect(Self.ids(one) == Self.ids(two))
        #expect(Self.ids(two).count > 60)
        #expect(!two.stdout.contains("# ERROR"), "\(two.stdout)")
        #expect(SupervisorTests.knobValue() == before)
    }

    @Test("a worker killed in a case that runs beside another: that case is an error, the other worker goes on, the knob comes back")
    func crashBeside() throws {
        guard let before = SupervisorTests.knobIfRoot() else { return }
        let victim = "cow/fork-child-writes/mthp-64k"
        let selection = ["--filter", "cow/fork-parent-writes/mthp-64k", "--filter", victim, "--filter", "cow/fork-parent-writes-mprotect/mthp-64k",
                         "--filter", "cow/fork-parent-writes/anon-page"]
        let o = try SupervisorTests.run(injecting: "\(victim):sigsegv", ["run", "--jobs", "2"] + selection)
        let (results, totals) = CLITests.checkKTAP(o.stdout)
        try #require(results.count == 4, "stdout: \(o.stdout)\nstderr: \(o.stderr)")
        let errors = results.filter { $0.contains(" # ERROR ") }
        #expect(errors.count == 1 && errors.first?.contains(" \(victim) # ERROR the cowpin worker was killed by SIGSEGV (signal 11) during this case") == true,
                "\(results)")
        #expect(totals?.hasSuffix(" error:1") == true)
        #expect(o.status == 2)
        #expect(SupervisorTests.knobValue() == before)
    }

    @Test("a case that would change a knob while others run beside it is a harness error, and changes nothing")
    func besideGuard() throws {
        guard SupervisorTests.knobIfRoot() != nil else { return }
        // Held as a supervisor holds it: no other run changes the knob
        // meanwhile, and no case of this process runs beside the test.
        try Runner.exclusively { try SystemState.shared.withLock {
            let before = try #require(StateTests.shown(SupervisorTests.knob))
            let other = before == "never" ? "madvise" : "never"
            SystemState.shared.besideOthers = true
            defer { SystemState.shared.besideOthers = false }
            #expect(throws: HarnessError.self) { try SystemState.shared.set(SupervisorTests.knob, other) }
            #expect(throws: HarnessError.self) { try SystemState.shared.lockForCase() }
            // The value it already has is no change: fine.
            try SystemState.shared.set(SupervisorTests.knob, before)
            #expect(StateTests.shown(SupervisorTests.knob) == before)
        } }
    }

    @Test("--jobs outside 1...64 is a usage error")
    func badJobs() throws {
        for bad in ["0", "65", "x"] {
            let o = try CLITests.cowpin("run", "--jobs", bad, "--filter", SupervisorTests.ids[0])
            #expect(o.status == 2, "\(bad): \(o.stderr)")
            #expect(o.stderr.contains("--jobs"), "\(o.stderr)")
        }
    }
}

/// The worker's messages decode to what it sent.
struct WorkerMessageTests {
    @Test("results round-trip through the worker's message line", arguments: [
        Verdict.coherent,
        .skip(reason: "needs \"root\"\\ and\ta tab\n"),
        .skip(reason: "a trailing backslash \\"),
        .error("\\t is not a tab, \\\\n not a newline"),
        .xfail(reason: "unfixed", reference: "mm/cow.c", evidence: Evidence(notes: ["n"])),
        .xpass(reason: "unfixed – ünïcode", reference: "ref"),
        .error("the cowpin worker was killed by SIGBUS (signal 7) during this case"),
        .decoherent(Evidence(findings: [Finding(view: "pin", expected: "0xff", meaning: "m", differingBytes: 1, differingPages: 1,
                                                totalRanges: 1, ranges: [])])),
    ])
    func roundTrip(_ v: Verdict) throws {
        let r = CaseResult(id: "cow/fork-parent-writes/anon-page", iteration: 2, verdict: v, durationNs: 1234,
                           phases: Phases(memoryNs: 1, scenarioNs: 2, cleanupNs: 3))
        let codec = WireCodec()
        let line = String(decoding: codec.encode(WorkerMessage(result: WorkerResult(r, number: 7))), as: UTF8.self)
        #expect(!line.contains("\n"))
        let m = try #require(codec.decode(Array(line.utf8)[...]))
        #expect(m.result?.number == 7)
        #expect(m.result?.caseResult == r)
    }
}

/// The worker gets the selection as index ranges into the catalog.
struct WorkerSelectionTests {
    @Test func rangesRoundTrip() throws {
        let all = Catalog.all
        let picks: [[Case]] = [all, [all[0]], Array(all[3...9]) + [all[12], all[11]] + Array(all.suffix(5)), [all[5], all[5]]]
        for cases in picks {
            let ranges = WorkerSelection.ranges(cases)
            let back = try #require(WorkerSelection.cases(ranges), "\(ranges)")
            #expect(back.map(\.id) == cases.map(\.id))
            #expect(WorkerSelection.digest(back) == WorkerSelection.digest(cases))
        }
        #expect(WorkerSelection.ranges(all) == "0-\(all.count - 1)")
        #expect(WorkerSelection.digest([all[0], all[1]]) != WorkerSelection.digest([all[1], all[0]]))
        for bad in ["", "x", "3-1", "-1", "0-\(all.count)", "1,,2-"] {
            #expect(WorkerSelection.cases(bad)?.count == nil, "\(bad)")
        }
    }
}
