import CowPin
import Foundation
import Testing

/// Global state: journaled, restored, recovered after a SIGKILL; interruption cleans up.
@Suite(.serialized)
struct StateTests {
    /// A knob no case changes, so tests running in parallel cannot race on it.
    static let knob = "/sys/kernel/mm/transparent_hugepage/khugepaged/pages_to_scan"

    static func shown(_ path: String) -> String? {
        (try? String(contentsOfFile: path, encoding: .utf8)).map { ProbeParsing.bracketed($0) ?? $0.trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    /// The knob's value, or nil (recorded as a skip) when the test cannot change it.
    static func knobValueIfRoot() -> String? {
        guard Probe.isRoot, let value = shown(knob) else {
            recordSkip("needs root and \(knob)")
            return nil
        }
        return value
    }

    static func other(than value: String) -> String { value == "4096" ? "4095" : "4096" }

    @Test("a knob changed for a case is back after it, and the journal is gone")
    func restoredAfterCase() throws {
        guard let before = Self.knobValueIfRoot() else { return }
        let target = Self.other(than: before)
        let s = Scenario(id: "selftest/knob", summary: "", steps: [], tags: ["selftest"]) { _ in
            try SystemState.shared.set(Self.knob, target)
            #expect(Self.shown(Self.knob) == target)
            #expect(FileManager.default.fileExists(atPath: SystemState.directory + "/journal-\(getpid())"))
        }
        #expect(Runner().run(Case(scenario: s, backing: .anonPage)).verdict == .coherent)
        #expect(Self.shown(Self.knob) == before)
        #expect(!FileManager.default.fileExists(atPath: SystemState.directory + "/journal-\(getpid())"))
    }

    @Test("a knob changed twice in a case is journaled once, with its value from before the case, and is back after it")
    func changedTwice() throws {
        guard let before = Self.knobValueIfRoot() else { return }
        let first = Self.other(than: before), second = first == "4096" ? "4094" : "4093"
        let journal = SystemState.directory + "/journal-\(getpid())"
        let s = Scenario(id: "selftest/knob-twice", summary: "", steps: [], tags: ["selftest"]) { _ in
            try SystemState.shared.set(Self.knob, first)
            try SystemState.shared.set(Self.knob, second)
            #expect(Self.shown(Self.knob) == second)
            let lines = ((try? String(contentsOfFile: journal, encoding: .utf8)) ?? "").split(separator: "\n")
            #expect(lines == ["knob\t\(Self.knob)\t\(before)"], "journal: \(lines)")
        }
        #expect(Runner().run(Case(scenario: s, backing: .anonPage)).verdict == .coherent)
        #expect(Self.shown(Self.knob) == before)
        #expect(!FileManager.default.fileExists(atPath: journal))
    }

    @Test("the journal of a SIGKILLed process is restored by the next run")
    func recoveredAfterKill() throws {
        guard let before = Self.knobValueIfRoot() else { return }
        let target = Self.other(than: before)
        // A process is SIGKILLed; then, under the lock (no other run recovers
        // it first), its journal is written as if it had recorded a knob
        // change, and the change is made, as cowpin does for its own.
        let hold = try OSPipe()
        final class PID: @unchecked Sendable { var value: Int32 = 0 }
        let deadPID = PID()
        let s = Scenario(id: "selftest/killed", summary: "", steps: [], tags: ["selftest"]) { ctx in
            let child = try ctx.fork { c in
                c.checkpoint()
                c.wait(for: hold, timeoutMs: 60_000)
            }
            try child.awaitCheckpoint()
            deadPID.value = child.pid
            kill(child.pid, SIGKILL)
            #expect(throws: HarnessError.self) { try child.finish() }
        }
        _ = Runner().run(Case(scenario: s, backing: .anonPage))
        let dead = deadPID.value
        try Runner.exclusively { try SystemState.shared.withLock {
            mkdir(SystemState.directory, 0o700)
            try "knob\t\(Self.knob)\t\(before)\n".write(toFile: SystemState.directory + "/journal-\(dead)", atomically: false, encoding: .utf8)
            try target.write(toFile: Self.knob, atomically: false, encoding: .utf8)
            #expect(Self.shown(Self.knob) == target)
            let restored = SystemState.recoverStale()
            #expect(restored.contains { $0.contains(Self.knob) && $0.contains("pid \(dead)") })
            #expect(Self.shown(Self.knob) == before)
            #expect(!FileManager.default.fileExists(atPath: SystemState.directory + "/journal-\(dead)"))
        } }
    }

    @Test("SIGTERM mid-run: children reaped, FUSE unmounted, state restored, exit 143")
    func interrupted() throws {
        guard Probe.isRoot else {
            recordSkip("needs root")
            return
        }
        var pid: pid_t = 0
        let args: [String] = [CLITests.binary.path, "run", "--filter", "odirect*", "--filter", "*mthp-64k", "--repeat", "100"]
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        // Named after this process: test runs of other checkouts may run meanwhile.
        let errPath = "/tmp/cowpin-interrupt-test-\(getpid()).err"
        defer { unlink(errPath) }
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(posix_spawn(&pid, CLITests.binary.path, &actions, nil, argv, environ) == 0)
        posix_spawn_file_actions_destroy(&actions)
        // The hold point: a worker of the run has mounted its FUSE server (an
        // O_DIRECT case ran or runs in it); without FUSE, a worker runs.
        let fuse = FuseTests.usable == nil
        var workers: [pid_t] = []
        let held = waitUntil(seconds: 120) {
            workers = SupervisorTests.children(of: pid)
            return !workers.isEmpty && (!fuse || workers.contains { w in FuseTests.cowpinMounts.contains { $0.hasPrefix("/tmp/cowpin-fuse-\(w)-") } })
        }
        kill(pid, SIGTERM)
        let st = reap(pid, seconds: 60)
        #expect(held, "the run's workers: \(workers) (one with a FUSE mount: \(fuse))")
        #expect(st.map { ($0 >> 8) & 0xff == 143 } == true, "wait status \(st.map(String.init) ?? "none: killed after 60 s")")
        let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        #expect(err.contains("interrupted by SIGTERM"), "stderr: \(err)")
        for p in [pid] + workers {
            #expect(!FuseTests.cowpinMounts.contains { $0.hasPrefix("/tmp/cowpin-fuse-\(p)-") }, "left mounted by \(p)")
            // Whatever it had changed is restored: its journal is gone. (The mTHP
            // knobs themselves are shared with cases running in parallel.)
            #expect(!FileManager.default.fileExists(atPath: SystemState.directory + "/journal-\(p)"))
        }
        // No child of the killed run is left.
        let children = (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.compactMap(Int32.init).filter { p in
            ((try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8)) ?? "").split(separator: " ").dropFirst(3).first == "\(pid)"
        } ?? []
        #expect(children.isEmpty, "left: \(children)")
    }
}
