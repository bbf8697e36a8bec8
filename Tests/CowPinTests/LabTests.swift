import CowPin
import Foundation
import Testing

/// What a copied cowpin needs outside a checkout (a lab rootfs, a guest's
/// initramfs), and the LAVA job that runs it there.
struct LabTests {
    @Test("the history compiled into cowpin is data/expected-verdicts.json, byte for byte, and loads")
    func embeddedHistory() throws {
        let file = try Data(contentsOf: URL(fileURLWithPath: FileManager.default.currentDirectoryPath + "/data/expected-verdicts.json"))
        #expect(ExpectedVerdicts.embeddedBytes == [UInt8](file))
        let h = try ExpectedVerdicts.embedded()
        #expect(h.problems.isEmpty)
        #expect(h.families.count == (try ExpectedVerdicts.load(path: "data/expected-verdicts.json")).families.count)
    }

    @Test("cowpin explain finds its history outside the checkout; --expected still overrides it")
    func historyOutsideCheckout() throws {
        let id = "iouring-fixed/mprotect-cycle-write/anon-page"
        let out = try CLITests.run(["explain", id, "--release", "5.15.0"], via: ["/bin/sh", "-c", "cd / && exec \"$0\" \"$@\""])
        #expect(out.status == 0, "\(out.stderr)")
        #expect(out.stdout.contains("expected on 5.15.0: decoherent"), "\(out.stdout)")
        #expect(!out.stdout.contains("unavailable"), "\(out.stdout)")
        let missing = try CLITests.run(["explain", id, "--expected", "/nonexistent/history.json"])
        #expect(missing.stdout.contains("upstream history: unavailable (cannot read /nonexistent/history.json)"), "\(missing.stdout)")
    }

    // MARK: the LAVA job (lava/)

    static let python = "/usr/bin/python3"

    /// Why LAVA's own schemas cannot be used here, or nil when they can.
    static var noLavaCommon: String? {
        guard let o = try? CLITests.run(["-c", "import lava_common.schemas.test.testdef"], via: [python], binary: false) else {
            return "\(python) does not run"
        }
        return o.status == 0 ? nil : "lava-common is not installed (scripts/setup installs it): \(o.stderr.split(separator: "\n").last ?? "")"
    }

    static func tempDir() throws -> String {
        var template = Array("/tmp/cowpin-lab-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw CaseSkip("mkdtemp: errno \(errno)") }
        return String(cString: p)
    }

    static func read(_ path: String) throws -> String {
        String(decoding: try Data(contentsOf: URL(fileURLWithPath: path)), as: UTF8.self)
    }

    @Test("lava/render writes a job, a device configuration and a test definition that LAVA's own schemas accept")
    func renderedJobValidates() throws {
        if let why = Self.noLavaCommon { recordSkip(why); return }
        let dir = try Self.tempDir()
        defer { _ = try? CLITests.run(["-rf", dir], via: ["/bin/rm"], binary: false) }
        let r = try CLITests.run(["lava/render", "--url", "https://lab.example/kernels/bzImage",
                                  "--ramdisk-url", "https://lab.example/cowpin-initramfs.cpio.gz", "--no-initramfs",
                                  "--filter", "iouring-fixed/*", "--filter", "cow/*/anon-page", "--tag", "fork",
                                  "--extra", "--jobs 2 --timeout 20", "--testdef-repo", "https://git.example/cowpin.git",
                                  "--testdef-revision", "0123456789abcdef0123456789abcdef01234567", "--out", dir],
                                 via: [], binary: false)
        #expect(r.status == 0, "\(r.stderr)")
        let job = try Self.read(dir + "/job.yaml")
        #expect(!job.contains("@"), "a field was left unrendered:\n\(job)")
        for line in ["url: \"https://lab.example/kernels/bzImage\"", "url: \"https://lab.example/cowpin-initramfs.cpio.gz\"",
                     "FILTERS: \"iouring-fixed/* cow/*/anon-page\"", "TAGS: \"fork\"", "EXTRA: \"--jobs 2 --timeout 20\"",
                     "repository: \"https://git.example/cowpin.git\"", "path: lava/cowpin.yaml", "lava: true"] {
            #expect(job.contains(line), "job.yaml lacks \(line)")
        }
        let v = try CLITests.run(["lava/validate", dir + "/job.yaml", dir + "/device.yaml"], via: [], binary: false)
        #expect(v.status == 0, "\(v.stdout)\(v.stderr)")
        #expect(v.stdout.contains("valid job") && v.stdout.contains("valid test definition") && v.stdout.contains("valid device"), "\(v.stdout)")

        // The schema check can fail: a job without its visibility, and a test
        // definition name LAVA refuses.
        for (from, to) in [("visibility: public\n", ""), ("      name: cowpin\n", "      name: cow pin\n")] {
            let bad = job.replacingOccurrences(of: from, with: to)
            #expect(bad != job)
            try bad.write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
            let b = try CLITests.run(["lava/validate", dir + "/bad.yaml"], via: [], binary: false)
            #expect(b.status == 1 && b.stdout.contains("INVALID job"), "\(b.stdout)\(b.stderr)")
        }
        // What a job parameter cannot carry is a usage error, before anything is written.
        let quote = try CLITests.run(["lava/render", "--url", "https://lab.example/bzImage", "--ramdisk-url", "https://lab.example/i.cpio.gz",
                                      "--no-initramfs", "--filter", "a\"b", "--out", dir], via: [], binary: false)
        #expect(quote.status == 2, "\(quote.stderr)")
    }

    @Test("lava-run accepts the rendered job and device (its own validation of the pipeline)")
    func lavaRunValidates() throws {
        guard access("/usr/bin/lava-run", X_OK) == 0 else { recordSkip("lava-run is not installed (Debian: lava-dispatcher)"); return }
        guard geteuid() == 0 else { recordSkip("lava-run runs as root only"); return }
        // lava-run keeps its job state under /var/lib/lava/dispatcher; in a VM
        // guest that sees the host's files read-only it cannot run.
        let candidates: [String] = ["/var/lib/lava/dispatcher", "/var/lib/lava", "/var/lib"]
        let state = candidates.first { access($0, F_OK) == 0 } ?? "/var/lib"
        guard access(state, W_OK) == 0 else {
            recordSkip("lava-run keeps its job state under /var/lib/lava/dispatcher, and \(state) is not writable here: \(String(cString: strerror(errno)))")
            return
        }
        let dir = try Self.tempDir()
        let job = "cowpin-validate-\(getpid())"
        // lava-run keeps a directory per job id, even for --validate.
        defer { _ = try? CLITests.run(["-rf", dir, "/var/lib/lava/dispatcher/tmp/" + job], via: ["/bin/rm"], binary: false) }
        // lava-run --validate checks that the files exist and that QEMU is there; the content is not booted.
        for f in ["kernel", "initramfs.cpio.gz"] { try "x".write(toFile: dir + "/" + f, atomically: true, encoding: .utf8) }
        let r = try CLITests.run(["lava/render", "--url", "file://\(dir)/kernel", "--ramdisk-url", "file://\(dir)/initramfs.cpio.gz",
                                  "--no-initramfs", "--filter", "iouring-fixed/*", "--out", dir], via: [], binary: false)
        #expect(r.status == 0, "\(r.stderr)")
        let v = try CLITests.run(["--validate", "--job-id", job, "--output-dir", dir + "/run",
                                  "--device", dir + "/device.yaml", dir + "/job.yaml"], via: ["/usr/bin/lava-run"], binary: false)
        #expect(v.status == 0, "\(v.stderr.suffix(3000))")
        #expect(v.stderr.contains("\"case\": \"validate\", \"definition\": \"lava\", \"result\": \"pass\""), "\(v.stderr.suffix(3000))")
    }

    /// Runs lava/cowpin-lava outside LAVA (it then prints the lava-test-case
    /// commands it would run) with the debug cowpin.
    static func mapping(_ env: [String]) throws -> CLITests.Output {
        try CLITests.run(["lava/cowpin-lava"], via: ["/usr/bin/env", "COWPIN=\(CLITests.binary.path)", "KTAP=/dev/null"] + env, binary: false)
    }

    @Test("the test definition reports each KTAP result as one LAVA test case, named by the case id, the reason kept out")
    func ktapToLavaTestCases() throws {
        // A worker crash in one case (a harness error, "not ok ... # ERROR"), a
        // case that runs, and the gup_test cases (skipped where gup_test is absent).
        let o = try Self.mapping(["FILTERS=cow/fork-parent-writes/anon-page cow/fork-child-writes/anon-page gup-test-ro/pin-ro-exclusive/anon-page",
                                  "COWPIN_INJECT_FAULT=cow/fork-child-writes/anon-page:sigsegv"])
        #expect(o.status == 0, "\(o.stdout)\(o.stderr)")
        let lines = o.stdout.split(separator: "\n").map(String.init)
        var mapped: [String: String] = [:]
        for (i, l) in lines.enumerated() where l.hasPrefix("ok ") || l.hasPrefix("not ok ") {
            let words = l.split(separator: " ").map(String.init)
            let id = l.hasPrefix("ok ") ? words[2] : words[3]
            let want = l.hasPrefix("not ok ") ? "fail" : (l.contains(" # SKIP ") ? "skip" : "pass")
            #expect(i + 1 < lines.count && lines[i + 1] == "lava-test-case \(id) --result \(want)", "after \(l): \(i + 1 < lines.count ? lines[i + 1] : "nothing")")
            mapped[id] = want
        }
        #expect(mapped.count == 3, "\(o.stdout)")
        #expect(mapped["cow/fork-parent-writes/anon-page"] == "pass")
        #expect(mapped["cow/fork-child-writes/anon-page"] == "fail")
        #expect(lines.filter { $0.hasPrefix("lava-test-case ") }.count == 3)
        #expect(o.stdout.contains("3 result(s) of a plan of 3"), "\(o.stdout)")
        #expect(!o.stdout.contains("lava-test-raise"), "\(o.stdout)")

        // A selection that matches nothing prints no plan: the test is raised, not quietly empty.
        let none = try Self.mapping(["FILTERS=no-such-family/*"])
        #expect(none.status == 1)
        #expect(none.stdout.contains("lava-test-raise cowpin run was cut short: 0 result(s) of a plan of none (exit 2)"), "\(none.stdout)")
    }

    @Test("lava/compare-results finds a case LAVA recorded differently from the KTAP")
    func compareResults() throws {
        if let why = Self.noLavaCommon { recordSkip(why); return } // python3-yaml comes with it
        let dir = try Self.tempDir()
        defer { _ = try? CLITests.run(["-rf", dir], via: ["/bin/rm"], binary: false) }
        func entry(_ lvl: String, _ msg: String) -> String { "{\"dt\": \"2026-01-01T00:00:00\", \"lvl\": \"\(lvl)\", \"msg\": \(msg)}" }
        func result(_ c: String, _ r: String) -> String { entry("results", "{\"case\": \"\(c)\", \"definition\": \"0_cowpin\", \"result\": \"\(r)\"}") }
        let ktap = ["TAP version 13", "1..3", "ok 1 a/b/c", "ok 2 a/b/d # SKIP no reason here", "# evidence", "not ok 3 a/b/e"]
        var log = ktap.map { entry("target", "\"\($0)\"") }
        log += [result("a/b/c", "pass"), result("a/b/d", "skip"), result("a/b/e", "fail"), entry("results", "{\"case\": \"job\", \"definition\": \"lava\", \"result\": \"pass\"}")]
        try log.joined(separator: "\n").write(toFile: dir + "/same.yaml", atomically: true, encoding: .utf8)
        let same = try CLITests.run(["lava/compare-results", dir + "/same.yaml"], via: [], binary: false)
        #expect(same.status == 0 && same.stdout.contains("same cases, same outcomes"), "\(same.stdout)\(same.stderr)")
        let other = log.map { $0.replacingOccurrences(of: "\"a/b/e\", \"definition\": \"0_cowpin\", \"result\": \"fail\"", with: "\"a/b/e\", \"definition\": \"0_cowpin\", \"result\": \"pass\"") }
        try other.joined(separator: "\n").write(toFile: dir + "/other.yaml", atomically: true, encoding: .utf8)
        let diff = try CLITests.run(["lava/compare-results", dir + "/other.yaml"], via: [], binary: false)
        #expect(diff.status == 1 && diff.stdout.contains("DIFFERENT: a/b/e: LAVA pass, KTAP fail"), "\(diff.stdout)\(diff.stderr)")
    }
}
