import CowPin
import Foundation
import Testing

/// The per-case kernel log: what the kernel says while a case runs is that
/// case's, a report (WARN, BUG, oops, lockup...) makes it `kernel-warning`,
/// and what userspace writes to /dev/kmsg is never taken for the kernel's.
@Suite(.serialized)
struct KernelLogTests {
    static func record(_ s: String) -> KernelRecord? { KernelRecord(Array(s.utf8)[...]) }

    @Test("a /dev/kmsg record: facility, level, sequence number, time, text")
    func parsesRecords() throws {
        let k = try #require(Self.record("4,2216,8935030599,-;WARNING: CPU: 1 PID: 7 at mm/gup.c:12 f+0x1/0x2\n SUBSYSTEM=x\n"))
        #expect(k.fromKernel && k.level == 4 && k.seq == 2216 && k.usec == 8935030599)
        #expect(k.text == "WARNING: CPU: 1 PID: 7 at mm/gup.c:12 f+0x1/0x2")
        #expect(k.line == "[ 8935.030599] WARNING: CPU: 1 PID: 7 at mm/gup.c:12 f+0x1/0x2")
        // What userspace writes carries the user facility (1): prio 8 + level.
        let u = try #require(Self.record("12,2217,8935030600,-;WARNING: written by a process"))
        #expect(!u.fromKernel && u.facility == 1 && u.level == 4)
        #expect(Self.record("not a record") == nil)
    }

    @Test("reports: each from its headline (and the cut-here line) to the end marker or the next report")
    func findsReports() throws {
        let texts = ["fuse: init", "------------[ cut here ]------------", "WARNING: CPU: 0 PID: 1 at mm/gup.c:1 x", "Call Trace:", " <TASK>",
                     "---[ end trace 0000000000000000 ]---", "zram0: detected capacity change",
                     "watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [ksmd:35]", "RIP: 0010:x", "INFO: task cat:12 blocked for more than 10 seconds.",
                     "BUG: KASAN: use-after-free in f", "BUG: Bad page state in process cat  pfn:1", "kernel BUG at mm/x.c:1!",
                     "rcu: INFO: rcu_preempt self-detected stall on CPU", "Oops: general protection fault"]
        let records = texts.enumerated().map { KernelRecord(level: 4, seq: UInt64($0.offset), usec: 1, text: $0.element) }
        let reports = KernelReport.find(in: records)
        #expect(reports.map(\.kind) == ["WARNING", "soft lockup", "hung task", "KASAN", "Bad page", "BUG", "RCU stall", "Oops"])
        #expect(reports[0].lines.count == 5 && reports[0].lines[0].hasSuffix("[ cut here ]------------"))
        #expect(reports[1].lines.count == 2)
        // Userspace lines are never a report, nor part of one.
        let user = [KernelRecord(facility: 1, level: 4, seq: 1, usec: 1, text: "WARNING: CPU: 0 PID: 1 at x")]
        #expect(KernelReport.find(in: user).isEmpty && CaseKernelLog(user).isEmpty)
        // A report makes the verdict kernel-warning, and says what the data check said.
        let v = Verdict.coherent.withKernelReports(reports)
        #expect(v.kind == .kernelWarning)
        #expect(v.reason?.hasPrefix("the kernel reported WARNING during this case: WARNING: CPU: 0 PID: 1 at mm/gup.c:1 x (and 7 more report(s)); data check: coherent") == true, "\(v)")
        var t = Totals()
        t.add(.coherent)
        t.add(.kernelWarning)
        t.add(.error)
        #expect(t.exitCode == 3)
        t.add(.decoherent)
        #expect(t.exitCode == 1)
    }

    /// /dev/kmsg readable and writable (root), or nil with the reason recorded.
    static func kmsgUsable() -> Bool {
        guard access("/dev/kmsg", R_OK | W_OK) == 0, KernelLogReader() != nil else {
            recordSkip("/dev/kmsg cannot be read and written here (needs root or dmesg_restrict=0)")
            return false
        }
        return true
    }

    @Test("a line a process writes to /dev/kmsg during a case is not the kernel's: no report, no kernel-warning")
    func userspaceLineIsNotTheKernels() throws {
        guard Self.kmsgUsable() else { return }
        let marker = "cowpin-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let s = Scenario(id: "selftest/kmsg-user-line", summary: "", steps: [], tags: ["selftest"]) { _ in
            // The priority prefix asks for facility 0 (kern) and KERN_WARNING: the
            // kernel keeps the user facility. (Lines a console reader would take
            // for a lockup or an oops are left out: scripts/vm-run reads the console.)
            for line in ["<4>WARNING: CPU: 0 PID: 1 at mm/gup.c:1 \(marker)", "UBSAN: shift-out-of-bounds in \(marker)"].map({ $0 + "\n" }) {
                let fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC)
                try #require(fd >= 0)
                #expect(write(fd, line, line.utf8.count) == line.utf8.count)
                close(fd)
            }
        }
        let r = Runner().run(Case(scenario: s, backing: .anonPage))
        #expect(r.verdict == .coherent, "\(r.verdict)")
        #expect(!(r.kernel?.lines ?? []).contains { $0.contains(marker) }, "\(r.kernel?.lines ?? [])")
        // The lines are in the log, as the user's: a reader from the start sees them.
        let seen = KernelLogReader.records(from: 0).filter { $0.text.contains(marker) }
        #expect(seen.count == 2 && seen.allSatisfy { $0.facility == 1 }, "\(seen)")
    }

    @Test("the kernel's own line about a worker killed by SIGSEGV is attached to that case and to no other")
    func segfaultLineGoesToItsCase() throws {
        guard Self.kmsgUsable() else { return }
        // x86 prints "comm[pid]: segfault at ..." for an unhandled SIGSEGV
        // when debug.exception-trace is 1 (the default), rate limited.
        guard (try? String(contentsOfFile: "/proc/sys/debug/exception-trace", encoding: .utf8))?.hasPrefix("1") == true else {
            recordSkip("debug.exception-trace is not 1: the kernel does not log segfaults")
            return
        }
        // In catalog order (the order of the results); the middle one crashes.
        let ids = ["cow/fork-parent-writes/anon-page", "cow/fork-parent-writes-mprotect/anon-page", "cow/fork-child-writes/anon-page"]
        let victim = ids[1]
        var lastOutput = ""
        // printk_ratelimit() may drop the line when other processes on the
        // machine just logged a burst: a few attempts, 6 s apart (its window is 5 s).
        for attempt in 1...3 {
            if attempt > 1 { sleep(6) }
            let o = try SupervisorTests.run(injecting: "\(victim):sigsegv", ["run", "--jobs", "1", "--format", "jsonl"] + ids.flatMap { ["--filter", $0] })
            lastOutput = o.stdout + o.stderr
            let doc = try JSONReporter.Document.decode(Array(o.stdout.utf8))
            try #require(doc.results.count == 3, "\(o.stdout)\n\(o.stderr)")
            let pid = try #require(o.stderr.split(separator: "(pid ").dropFirst().first.flatMap { Int($0.prefix { $0.isNumber }) })
            let line = "cowpin-worker[\(pid)]: segfault at "
            let owners = doc.results.filter { ($0.kernel?.lines ?? []).contains { $0.contains(line) } }.map(\.id)
            guard !owners.isEmpty else { continue }
            #expect(owners == [victim], "\(owners)")
            let r = doc.results[1]
            #expect(r.id == victim && r.verdict == .error && r.reason?.contains("SIGSEGV") == true, "\(r)")
            #expect(r.kernel?.reports.isEmpty == true)
            #expect(doc.results[0].verdict == .coherent && doc.results[2].verdict == .coherent)
            return
        }
        Issue.record("no attempt logged the worker's segfault line in its case: \(lastOutput)")
    }
}
