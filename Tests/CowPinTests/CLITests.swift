import CowPin
import Foundation
import Testing

/// The `cowpin` executable, run as a user runs it.
struct CLITests {
    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
        /// The process that ran (its FUSE mounts and journal carry this pid).
        var pid: pid_t = 0
    }

    static var binary: URL {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return exe.deletingLastPathComponent().appendingPathComponent("cowpin")
    }

    static func cowpin(_ args: String...) throws -> Output { try run(args) }

    /// posix_spawn()s the binary (or `program` with the binary's path as an
    /// argument) and collects its output; bounded (kills after 300 s).
    static func run(_ args: [String], via program: [String] = [], binary: Bool = true) throws -> Output {
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else { throw CaseSkip("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        for fd in outPipe + errPipe { posix_spawn_file_actions_addclose(&actions, fd) }
        let command = program + (binary ? [Self.binary.path] : []) + args
        let argv = command.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, command[0], &actions, nil, argv, environ)
        close(outPipe[1])
        close(errPipe[1])
        guard r == 0 else { throw CaseSkip("posix_spawn \(command[0]): \(r)") }
        var out = [UInt8](), err = [UInt8]()
        var fds = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0), pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        let deadline = ContinuousClock.now + .seconds(300)
        var buf = [UInt8](repeating: 0, count: 65536)
        while fds.contains(where: { $0.fd >= 0 }) && ContinuousClock.now < deadline {
            guard poll(&fds, 2, 1000) >= 0 || errno == EINTR else { break }
            for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = read(fds[i].fd, &buf, buf.count)
                if n <= 0 {
                    close(fds[i].fd)
                    fds[i].fd = -1
                } else if i == 0 { out += buf[0..<n] } else { err += buf[0..<n] }
            }
        }
        for f in fds where f.fd >= 0 { close(f.fd) }
        if ContinuousClock.now >= deadline { kill(pid, SIGKILL) }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Output(status: code, stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self), pid: pid)
    }

    @Test func executableIsBuilt() {
        #expect(FileManager.default.isExecutableFile(atPath: Self.binary.path), "swift test builds the cowpin executable next to the tests")
    }

    @Test("bad input exits 2 with a clear message", arguments: [
        (["run", "--filter", "nosuch*"], "no case matches filter 'nosuch*'"),
        (["run", "--tag", "nosuchtag"], "unknown tag 'nosuchtag'"),
        (["run", "--repeat", "0"], "--repeat must be between 1 and 100000"),
        (["run", "--repeat", "many"], "many"),
        (["run", "--format", "xml"], "xml"),
        (["run", "--timeout", "-1"], "--timeout"),
        (["list", "--format", "ktap"], "list supports --format text or json"),
        (["explain", "no/such/case"], "unknown case 'no/such/case'"),
        (["frobnicate", "--now"], "unknown command 'frobnicate'"),
    ])
    func badInput(_ args: [String], _ message: String) throws {
        let o = try Self.run(args)
        #expect(o.status == 2)
        #expect(o.stderr.contains(message), "stderr: \(o.stderr)")
    }

    @Test("as an unprivileged user nothing crashes: cases run or skip with the reason")
    func unprivileged() throws {
        let setpriv = "/usr/bin/setpriv"
        guard Probe.isRoot, FileManager.default.isExecutableFile(atPath: setpriv) else {
            recordSkip("needs root and setpriv to drop privileges")
            return
        }
        let o = try Self.run(["run", "--filter", "cow/*", "--filter", "odirect-thread/*", "--filter", "iouring-fixed/*",
                              "--filter", "vmsplice/*", "--filter", "longterm-file/*"],
                             via: [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"])
        #expect(o.stdout.contains("euid 65534"))
        let results = o.stdout.split(separator: "\n").filter { $0.hasPrefix("ok ") || $0.hasPrefix("not ok ") }
        let failed = results.filter { $0.hasPrefix("not ok") }.joined(separator: "\n")
        #expect(o.status == 0 || o.status == 4, "exit \(o.status): \(o.stderr)\n\(failed)")
        #expect(!results.isEmpty && failed.isEmpty, "\(failed)")
        #expect(o.stdout.contains("# SKIP mounting cowpin's FUSE file system needs CAP_SYS_ADMIN"))
        #expect(results.contains { !$0.contains(" # SKIP ") }, "some cases run without privileges")
    }

    @Test func helpExitsZero() throws {
        let o = try Self.cowpin("--help")
        #expect(o.status == 0)
        #expect(o.stdout.contains("Exit status of `run`"))
    }

    /// Checks the KTAP shape: the header, the plan on the next line, numbered
    /// results matching the plan, totals.
    static func checkKTAP(_ text: String) -> (results: [String], totals: String?) {
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.first == KTAPReporter.header)
        let plan = lines.dropFirst().first
        #expect(plan?.hasPrefix("1..") == true, "the plan must follow the header: \(plan ?? "none")")
        let planned = plan.flatMap { Int($0.dropFirst(3)) }
        let results = lines.filter { $0.hasPrefix("ok ") || $0.hasPrefix("not ok ") }
        #expect(planned == results.count, "plan \(plan ?? "missing") vs \(results.count) result lines")
        for (i, r) in results.enumerated() {
            let rest = r.hasPrefix("ok ") ? r.dropFirst(3) : r.dropFirst(7)
            #expect(rest.hasPrefix("\(i + 1) "), "result \(i + 1) out of order: \(r)")
        }
        for l in lines where !(l.hasPrefix("ok ") || l.hasPrefix("not ok ") || l.hasPrefix("#") || l.hasPrefix("1..") || l == KTAPReporter.header) {
            Issue.record("not a KTAP line: \(l)")
        }
        return (results, lines.last { $0.hasPrefix("# Totals:") })
    }

    @Test func runEmitsWellFormedKTAP() throws {
        let o = try Self.cowpin("run", "--filter", "cow/*", "--filter", "vmsplice/*", "--timing")
        let (results, totals) = Self.checkKTAP(o.stdout)
        #expect(results.count == (try Selection(filters: ["cow/*", "vmsplice/*"]).select()).count)
        let pass = results.filter { $0.hasPrefix("ok ") && !$0.contains(" # ") }.count
        let skip = results.filter { $0.contains(" # SKIP ") }.count
        let fail = results.filter { $0.hasPrefix("not ok ") && !$0.contains(" # ERROR ") }.count
        let error = results.filter { $0.contains(" # ERROR ") }.count
        let xfail = results.filter { $0.contains(" # XFAIL ") }.count
        let xpass = results.filter { $0.contains(" # XPASS ") }.count
        #expect(totals == "# Totals: pass:\(pass) fail:\(fail) xfail:\(xfail) xpass:\(xpass) skip:\(skip) error:\(error)")
        let expected: Int32 = fail > 0 ? 1 : error > 0 ? 2 : skip == results.count ? 4 : 0
        #expect(o.status == expected)
        #expect(o.stdout.contains("# total: "))
    }

    @Test("an empty selection is a usage error that says why, with or without a worker")
    func emptySelection() throws {
        for (args, why) in [(["--exclude", "*"], "--exclude leaves out every selected case"),
                            (["--tag", "ksm", "--tag", "hugetlb"], "no case carries all of the tags ksm, hugetlb"),
                            (["--filter", "*hugetlb-1048576k"], "add --slow"),
                            (["--in-process", "--exclude", "*"], "--exclude leaves out every selected case")] {
            let o = try Self.run(["run"] + args)
            #expect(o.status == 2, "\(args): exit \(o.status)")
            #expect(o.stderr.contains(why), "\(args): \(o.stderr)")
            #expect(o.stdout.isEmpty, "\(args) printed \(o.stdout)")
        }
    }

    @Test("bad matrix arguments are usage errors, and an endless input is refused")
    func matrixInput() throws {
        for arg in ["x=", "=", "LABEL="] {
            let o = try Self.cowpin("matrix", "--expected", "data/expected-verdicts.json", arg)
            #expect(o.status == 2 && o.stderr.contains("names no result file"), "\(arg): \(o.status) \(o.stderr)")
        }
        let zero = try Self.cowpin("matrix", "--expected", "data/expected-verdicts.json", "/dev/zero")
        #expect(zero.status == 2 && zero.stderr.contains("larger than"), "\(zero.status) \(zero.stderr)")
        let bisect = try Self.cowpin("run", "--bisect", "cow/fork-parent-writes/anon-page", "--filter", "vmsplice/*")
        #expect(bisect.status == 2 && bisect.stderr.contains("--bisect runs the one case it names"))
        let text = try Self.cowpin("run", "--format", "text")
        #expect(text.status == 2)
        let help = try Self.cowpin("run", "--help")
        let words = help.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(words.contains("values: ktap, json, jsonl;") && !words.contains("text"), "\(words)")
    }

    @Test("a typo gets a suggestion: a command, a filter, a tag")
    func suggestions() throws {
        let lst = try Self.cowpin("lst")
        #expect(lst.status == 2 && lst.stderr.contains("unknown command 'lst'; did you mean 'list'?"), "\(lst.stderr)")
        let filter = try Self.cowpin("run", "--filter", "iouring-fxed/fork-parent-writes/*")
        #expect(filter.status == 2 && filter.stderr.contains("did you mean 'iouring-fixed/fork-parent-writes/*'?"), "\(filter.stderr)")
        let tag = try Self.cowpin("list", "--tag", "hugtlb")
        #expect(tag.status == 2 && tag.stderr.contains("did you mean 'hugetlb'?"), "\(tag.stderr)")
        // No usage text after an error found while running, and no empty line after a success.
        #expect(!filter.stderr.contains("Usage:"))
        let version = try Self.cowpin("--version")
        #expect(version.status == 0 && version.stdout == Catalog.version + "\n")
    }

    @Test("out of file descriptors: the run says EMFILE, once, and crashes nowhere")
    func outOfDescriptors() throws {
        // How many descriptors a run needs depends on what the environment
        // leaves open: try a range of limits (descriptors 3-9 closed first).
        var ranOut = 0
        for limit in 7...13 {
            let o = try Self.run([], via: ["/bin/sh", "-c",
                "exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; ulimit -n \(limit); exec \"$0\" run --filter cow/fork-parent-writes/anon-page --quiet"])
            #expect(o.status < 128, "limit \(limit): exit \(o.status) (a signal): \(o.stderr)")
            guard o.status != 0 else { continue }
            ranOut += 1
            let result = o.stdout.split(separator: "\n").first { $0.hasPrefix("not ok 1 ") } ?? ""
            #expect(o.status == 2 && (result.contains("EMFILE") || o.stderr.contains("EMFILE")), "limit \(limit): \(o.status) \(o.stdout) \(o.stderr)")
            #expect(!result.contains("before its cases were done before"))
        }
        #expect(ranOut > 0, "no limit from 7 to 13 ran out of descriptors")
    }

    @Test("--format jsonl streams: a run SIGKILLed after some results leaves each finished case on disk, and the matrix reads it")
    func jsonLinesSurviveAKill() throws {
        let file = "/tmp/cowpin-jsonl-\(getpid()).jsonl"
        defer { unlink(file) }
        // Kill the supervisor once three results are on disk (bounded wait, no timing luck).
        let script = """
            "$0" run --format jsonl --filter 'cow/fork-parent-writes/*' --jobs 1 > \(file) 2>/dev/null & p=$!
            for i in $(seq 1 600); do [ "$(grep -c '"type":"result"' \(file))" -ge 3 ] && break; sleep 0.05; done
            kill -KILL $p; wait $p 2>/dev/null; exit 0
            """
        _ = try Self.run([], via: ["/bin/sh", "-c", script])
        let bytes = try #require(readBytes(file))
        let doc = try JSONReporter.Document.decode(bytes)
        #expect(doc.complete == false, "a killed run has no totals line")
        #expect(doc.results.count >= 3 && doc.results.count < 54, "\(doc.results.count) results")
        #expect(doc.schema == JSONReporter.schema && doc.probe != nil && doc.started != nil)
        #expect(doc.results.allSatisfy { $0.id.hasPrefix("cow/fork-parent-writes/") })
        let m = Matrix(expected: try MatrixTests.history, runs: [("cut", doc)])
        #expect(m.rows.count == doc.results.count)
        // vm-matrix's view of a kernel that died: its column holds what arrived, the
        // table says why it stops short, a kernel with no result is listed, --check fails.
        let o = try Self.cowpin("matrix", "--expected", "data/expected-verdicts.json", "--check",
                                "--untested", "cut: exit 125: vm-run: soft lockup", "--untested", "gone: exit 125: the guest never reached the test",
                                "cut=\(file)")
        #expect(o.status == 1, "\(o.stdout)\n\(o.stderr)")
        #expect(o.stdout.contains("  - **not tested to the end**: exit 125: vm-run: soft lockup (the column holds the \(doc.results.count) case(s) that finished)"),
                "\(o.stdout)")
        #expect(o.stdout.contains("Kernels that could not be tested (no column):\n- **gone**: exit 125: the guest never reached the test"), "\(o.stdout)")
        #expect(o.stderr.contains("matrix: gone could not be tested: exit 125: the guest never reached the test"), "\(o.stderr)")
    }

    /// tap.py (Debian python3-tap), a generic TAP consumer: scripts/setup
    /// installs it. Its command-line consumer, run with the system Python.
    static let tappy: [String]? = access("/usr/lib/python3/dist-packages/tap/main.py", R_OK) == 0
        ? ["/usr/bin/python3", "-c", "import sys; from tap.main import main; sys.exit(main(sys.argv))"] : nil

    @Test("a real TAP parser (tap.py) accepts a full run and reports a cut one as incomplete",
          .enabled(if: tappy != nil, "tap.py is not installed (scripts/setup installs it)"))
    func tapParser() throws {
        let o = try Self.cowpin("run", "--filter", "cow/fork-parent-writes/*")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cowpin-tap-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let full = dir.appendingPathComponent("full.tap"), cut = dir.appendingPathComponent("cut.tap")
        try o.stdout.write(to: full, atomically: true, encoding: .utf8)
        // A run that died after its tenth result.
        let lines = o.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        let tenth = lines.firstIndex { $0.hasPrefix("ok 10 ") || $0.hasPrefix("not ok 10 ") }!
        try (lines[...tenth].joined(separator: "\n") + "\n").write(to: cut, atomically: true, encoding: .utf8)
        let planned = try Selection(filters: ["cow/fork-parent-writes/*"]).select().count
        let whole = try Self.run([full.path], via: Self.tappy!, binary: false).status
        #expect(whole == 0, "tap.py rejected a full run")
        let short = try Self.run([cut.path], via: Self.tappy!, binary: false)
        #expect(short.status != 0, "tap.py accepted a run cut after 10 of \(planned) results")
        #expect((short.stdout + short.stderr).contains("Expected \(planned) tests but only 10 ran"))
    }

    @Test func repeatNumbersEveryRun() throws {
        let o = try Self.cowpin("run", "--filter", "cow/fork-parent-writes/anon-page", "--repeat", "3")
        let (results, _) = Self.checkKTAP(o.stdout)
        #expect(results.count == 3)
        #expect(results.last?.hasSuffix("cow/fork-parent-writes/anon-page (run 3 of 3)") == true)
    }

    @Test func jsonRun() throws {
        let o = try Self.cowpin("run", "--filter", "gup-test-ro/*", "--format", "json")
        let doc = try JSONDecoder().decode(JSONReporter.Document.self, from: Data(o.stdout.utf8))
        #expect(doc.results.count == (try Selection(filters: ["gup-test-ro/*"]).select()).count)
        #expect(doc.exitCode == o.status)
        if !Probe.current().gupTest.available {
            // Every case skipped, each with the reason: exit status 4.
            #expect(o.status == 4)
            #expect(doc.results.allSatisfy { $0.verdict == .skip && ($0.reason ?? "").contains("gup_test") })
        }
    }

    @Test func listAndProbeAndExplain() throws {
        let list = try Self.cowpin("list", "--format", "json")
        #expect(list.status == 0)
        let entries = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]]
        #expect(entries?.count == (try Selection().select()).count)
        let all = try Self.cowpin("list", "--slow", "--format", "json")
        let allEntries = try JSONSerialization.jsonObject(with: Data(all.stdout.utf8)) as? [[String: Any]]
        #expect(allEntries?.count == Catalog.all.count)

        let probe = try Self.cowpin("probe", "--format", "json")
        #expect(probe.status == 0)
        let p = try JSONDecoder().decode(Probe.self, from: Data(probe.stdout.utf8))
        #expect(p.kernel.release == Probe.current().kernel.release)

        let text = try Self.cowpin("probe")
        #expect(text.stdout.contains("io_uring:") && text.stdout.contains("THP:"))

        let explain = try Self.cowpin("explain", "iouring-fixed/fork-parent-writes/thp-pmd")
        #expect(explain.status == 0)
        #expect(explain.stdout.contains("fork(); the child stays alive"))
    }
}
