import CCowPin
import CowPin
import Foundation
import Testing

/// cowpin's FUSE server: bounded holds, and nothing left mounted.
@Suite(.serialized)
struct FuseTests {
    static var cowpinMounts: [String] {
        (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8))?
            .split(separator: "\n").compactMap { line -> String? in
                let f = line.split(separator: " ")
                return f.count > 4 && f[4].hasPrefix("/tmp/cowpin-fuse-") ? String(f[4]) : nil
            } ?? []
    }

    static var usable: String? { ODirectCases.requirement(Probe.current()) }

    @Test("a request held past the timeout is an error, the connection is aborted, nothing stays mounted")
    func heldPastTimeout() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        final class Box: @unchecked Sendable { var mountpoint = "" }
        let box = Box()
        let stuck = Scenario(id: "selftest/fuse-stuck", summary: "", steps: [], tags: ["selftest"]) { ctx in
            let server = try ctx.fuseServer()
            box.mountpoint = server.mountpoint
            let fd = try ctx.open(server)
            server.holdNextRead()
            let io = try Submitter.thread.start(write: false, fd: fd, address: ctx.region.base, length: 2048, ring: nil)
            try server.awaitHeldRead()
            // Never released: the wait for completion must give up.
            _ = try io.complete(timeoutMs: ctx.timeoutMs)
        }
        let runner = Runner(options: RunOptions(timeoutMs: 500))
        let start = ContinuousClock.now
        let v = runner.run(Case(scenario: stuck, backing: .anonPage)).verdict
        #expect(ContinuousClock.now - start < .seconds(10))
        guard case .error(let m) = v else {
            Issue.record("expected error, got \(v)")
            return
        }
        #expect(m.contains("did not complete within 500 ms"))
        // (Other suites may have their own mounts up meanwhile: look for ours only.)
        #expect(!box.mountpoint.isEmpty && !Self.cowpinMounts.contains(box.mountpoint), "left mounted: \(box.mountpoint)")
        #expect(!FileManager.default.fileExists(atPath: box.mountpoint))
    }

    @Test("mounts and directories of a cowpin process that died are removed")
    func staleMountsRemoved() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        // A pid that is certainly dead: a child we reaped.
        let dead = try Runner.exclusively { () -> Int32 in
            let pid = fork()
            if pid == 0 { _exit(0) }
            var st: Int32 = 0
            waitpid(pid, &st, 0)
            return pid
        }
        let dir = "/tmp/cowpin-fuse-\(dead)-stale"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)
        try #require(fd >= 0)
        let mounted = mount("cowpin", dir, "fuse", 0, "fd=\(fd),rootmode=40000,user_id=0,group_id=0")
        close(fd) // the server is gone: a dead connection, as after SIGKILL
        try #require(mounted == 0)
        #expect(Self.cowpinMounts.contains(dir))
        FuseServer.removeStale()
        #expect(!Self.cowpinMounts.contains(dir))
        #expect(!FileManager.default.fileExists(atPath: dir))
    }
}
