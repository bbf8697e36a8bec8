import CowPin
import Foundation
import Testing

/// The `cowpin` executable, run as a user runs it.
struct CLITests {
    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static var binary: URL {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return exe.deletingLastPathComponent().appendingPathComponent("cowpin")
    }

    static func cowpin(_ args: String...) throws -> Output { try run(args) }

    /// posix_spawn()s the binary (or `program` with the binary's path as an
    /// argument) and collects its output; bounded (kills after 300 s).
    static func run(_ args: [String], via program: [String] = []) throws -> Output {
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else { throw CaseSkip("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        for fd in outPipe + errPipe { posix_spawn_file_actions_addclose(&actions, fd) }
        let command = program + [binary.path] + args
        let argv = command.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, command[0], &actions, nil, argv, environ)
        close(outPipe[1])
        close(errPipe[1])
        guard r == 0 else { throw CaseSkip("posix_spawn \(binary.path): \(r)") }
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
        return Output(status: code, stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self))
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
        (["frobnicate", "--now"], "--now"),
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

    /// Checks KTAP v1 shape: version, plan, numbered results matching the plan, totals.
    static func checkKTAP(_ text: String) -> (results: [String], totals: String?) {
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.first == "KTAP version 1")
        let plan = lines.first { $0.hasPrefix("1..") }
        let planned = plan.flatMap { Int($0.dropFirst(3)) }
        let results = lines.filter { $0.hasPrefix("ok ") || $0.hasPrefix("not ok ") }
        #expect(planned == results.count, "plan \(plan ?? "missing") vs \(results.count) result lines")
        for (i, r) in results.enumerated() {
            let rest = r.hasPrefix("ok ") ? r.dropFirst(3) : r.dropFirst(7)
            #expect(rest.hasPrefix("\(i + 1) "), "result \(i + 1) out of order: \(r)")
        }
        for l in lines where !(l.hasPrefix("ok ") || l.hasPrefix("not ok ") || l.hasPrefix("#") || l.hasPrefix("1..") || l.hasPrefix("KTAP")) {
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
