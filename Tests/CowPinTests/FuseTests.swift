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

    /// This process's cowpin FUSE mounts.
    static var ownMounts: [String] { cowpinMounts.filter { $0.hasPrefix("/tmp/cowpin-fuse-\(getpid())-") } }

    /// Mountpoints the cases of a test saw, in order.
    final class Seen: @unchecked Sendable {
        var mountpoints: [String] = []
        var mountsDuring: [Int] = []
        var fd: Int32 = -1
    }

    static func scenario(_ id: String, _ body: @escaping @Sendable (CaseContext) throws -> Void) -> Scenario {
        Scenario(id: "selftest/\(id)", summary: id, steps: [], tags: ["selftest"],
                 requires: { ODirectCases.requirement($0) }, body: body)
    }

    /// A held O_DIRECT read, answered: the case leaves the server idle.
    static func cleanRead(_ seen: Seen) -> Scenario {
        scenario("fuse-clean-read") { ctx in
            let server = try ctx.fuseServer()
            seen.mountpoints.append(server.mountpoint)
            seen.mountsDuring.append(Self.ownMounts.count)
            let fd = try ctx.open(server)
            let half = ctx.region.pageSize / 2
            server.holdNextRead()
            let io = try Submitter.thread.start(write: false, fd: fd, address: ctx.region.base, length: half, ring: nil)
            try server.awaitHeldRead()
            try server.releaseRead()
            _ = try io.complete(timeoutMs: ctx.timeoutMs)
            ctx.expect("parent mapping", holds: server.readData, seen: UnsafeRawBufferPointer(rebasing: ctx.region.bytes[0..<half]),
                       meaning: "the read's data did not arrive")
        }
    }

    func run(_ s: Scenario, timeoutMs: Int32 = 10_000) -> Verdict {
        Runner(options: RunOptions(timeoutMs: timeoutMs)).run(Case(scenario: s, backing: .anonPage)).verdict
    }

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
        guard let m = errorMessage(v) else { return }
        #expect(m.contains("did not complete within 500 ms"))
        // (Other suites may have their own mounts up meanwhile: look for ours only.)
        #expect(!box.mountpoint.isEmpty && !Self.cowpinMounts.contains(box.mountpoint), "left mounted: \(box.mountpoint)")
        #expect(!FileManager.default.fileExists(atPath: box.mountpoint))
    }

    @Test("consecutive cases reuse one mount, and each gets its own read data")
    func reusedAcrossCases() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let seen = Seen()
        for _ in 0..<3 {
            let v = run(Self.cleanRead(seen))
            #expect(v == .coherent, "\(v)")
        }
        #expect(seen.mountpoints.count == 3 && Set(seen.mountpoints).count == 1, "\(seen.mountpoints)")
        #expect(seen.mountsDuring == [1, 1, 1])
        #expect(Self.ownMounts == [seen.mountpoints[0]])
        // A case of the catalog, on the same mount.
        let before = FuseServer.sharedMountpoint
        let c = try #require(Catalog.find("odirect-thread/write-shared-parent-writes/anon-page"))
        let v = Runner().run(c).verdict
        #expect(v.kind != .error && v.kind != .skip, "\(v)")
        #expect(before != nil && FuseServer.sharedMountpoint == before)
        #expect(Self.ownMounts.count == 1)
    }

    @Test("a WRITE of the previous case is never taken for the current case's")
    func writesIsolated() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let seen = Seen()
        // Writes 0xaa through the file and leaves the server's record of it unread.
        let writer = Self.scenario("fuse-unread-write") { ctx in
            let server = try ctx.fuseServer()
            seen.mountpoints.append(server.mountpoint)
            let fd = try ctx.open(server)
            let buffer = try Region.anonymous(size: ctx.region.pageSize)
            defer { buffer.release() }
            buffer.fill(.written(0xAA, by: "the previous case"))
            guard pwrite(fd, buffer.base, 2048, 0) == 2048 else { throw HarnessError("pwrite: \(errno)") }
        }
        // A queued write of the region's original content: the server must report that one.
        let queued = Self.scenario("fuse-queued-write") { ctx in
            let write = try QueuedWrite(ctx, .thread, length: 2048)
            seen.mountpoints.append(write.server.mountpoint)
            try ctx.expect(write, holds: ctx.original, meaning: "the server reported another case's WRITE")
        }
        #expect(run(writer) == .coherent)
        let v = run(queued)
        #expect(v == .coherent, "\(v)")
        #expect(seen.mountpoints.count == 2 && seen.mountpoints[0] == seen.mountpoints[1], "\(seen.mountpoints)")
    }

    @Test("a case that fails with a READ held gets its server shut down; the next case mounts a fresh one")
    func failedCaseFreshServer() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let seen = Seen()
        let failing = Self.scenario("fuse-fails-holding") { ctx in
            let server = try ctx.fuseServer()
            seen.mountpoints.append(server.mountpoint)
            let fd = try ctx.open(server)
            server.holdNextRead()
            let io = try Submitter.iouring.start(write: false, fd: fd, address: ctx.region.base, length: 2048, ring: nil)
            try withExtendedLifetime(io) {
                try server.awaitHeldRead()
                throw HarnessError("injected failure with the READ held")
            }
        }
        #expect(run(failing) == .error("injected failure with the READ held"))
        let first = try #require(seen.mountpoints.first)
        #expect(!Self.cowpinMounts.contains(first), "left mounted: \(first)")
        #expect(!FileManager.default.fileExists(atPath: first))
        #expect(FuseServer.sharedMountpoint == nil)
        #expect(run(Self.cleanRead(seen)) == .coherent)
        #expect(seen.mountpoints.count == 2 && seen.mountpoints[1] != first, "\(seen.mountpoints)")
        #expect(seen.mountsDuring == [1])
    }

    @Test("a file of the previous case still open: the next case gets a fresh server, the old connection is aborted")
    func fileLeftOpenFreshServer() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let seen = Seen()
        let leaking = Self.scenario("fuse-leaks-fd") { ctx in
            let server = try ctx.fuseServer()
            seen.mountpoints.append(server.mountpoint)
            seen.fd = try server.openFile() // not closed when the case ends
        }
        #expect(run(leaking) == .coherent)
        defer { close(seen.fd) }
        let first = try #require(seen.mountpoints.first)
        #expect(FuseServer.sharedMountpoint == first, "an idle server stays mounted")
        #expect(run(Self.cleanRead(seen)) == .coherent)
        #expect(seen.mountpoints.count == 2 && seen.mountpoints[1] != first, "\(seen.mountpoints)")
        #expect(!Self.cowpinMounts.contains(first), "left mounted: \(first)")
        // I/O on the leaked file fails: nothing of it can reach a server any more.
        var b = [UInt8](repeating: 0, count: 512)
        #expect(pread(seen.fd, &b, b.count, 0) < 0)
    }

    /// Spawns the binary with its output discarded; its pid.
    static func spawn(_ args: [String]) throws -> pid_t {
        var pid: pid_t = 0
        let argv = ([CLITests.binary.path] + args).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        try #require(posix_spawn(&pid, CLITests.binary.path, &actions, nil, argv, environ) == 0)
        return pid
    }

    static func mounts(of pid: pid_t) -> [String] { cowpinMounts.filter { $0.hasPrefix("/tmp/cowpin-fuse-\(pid)-") } }

    @Test("a run leaves no cowpin FUSE mount behind")
    func nothingLeftAfterRun() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let o = try CLITests.run(["run", "--in-process", "--format", "json", "--filter", "odirect-thread/*", "--filter", "odirect-iouring/*"])
        let pid = o.pid
        // Every case ran to a verdict, and the exit status is the one its
        // verdicts give: 0, or 1 where the kernel is decoherent (O_DIRECT
        // reads held across fork() are, before 6.9). Never a harness error.
        let doc = try #require(try? JSONDecoder().decode(JSONReporter.Document.self, from: Data(o.stdout.utf8)),
                               "exit \(o.status), stdout: \(o.stdout.suffix(2000))\nstderr: \(o.stderr)")
        #expect(doc.totals.error == 0, "\(doc.results.filter { $0.verdict == .error }.map { "\($0.id): \($0.reason ?? "")" })")
        #expect(doc.totals.skip < doc.results.count, "every case skipped")
        #expect(o.status == doc.exitCode && o.status == doc.totals.exitCode && [0, 1].contains(o.status), "exit \(o.status), totals \(doc.totals)")
        #expect(Self.mounts(of: pid).isEmpty, "left: \(Self.mounts(of: pid))")
        let dirs = ((try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []).filter { $0.hasPrefix("cowpin-fuse-\(pid)-") }
        #expect(dirs.isEmpty, "left: \(dirs)")
    }

    @Test("the mount of a run SIGKILLed while a thread waits for its own FUSE server is removed by the next run, and the run exits")
    func killedRunCleanedByNext() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        let pid = try Self.spawn(["run", "--in-process", "--filter", "odirect-thread/read-fork-parent-writes/*", "--repeat", "100000"])
        var mount: String?
        var waiting = false
        // The hard moment: a thread waits in the kernel for the answer to a
        // READ the run's own server has read (held). Polled, bounded.
        let deadline = ContinuousClock.now + .seconds(20)
        while !(mount != nil && waiting) && ContinuousClock.now < deadline {
            mount = Self.mounts(of: pid).first
            waiting = Self.threadWaitsForFUSE(pid)
            if !waiting { usleep(100) }
        }
        #expect(waiting, "no thread of the run was seen waiting for a FUSE answer")
        kill(pid, SIGKILL)
        // It exits, or (killed while a thread waited for an answer its own
        // server had read) its main thread is a zombie, the other stuck until
        // the connection is aborted: the next run must do that.
        var st: Int32 = 0
        var reaped = false
        let exitBound = ContinuousClock.now + .seconds(10)
        while !reaped && !Self.isZombie(pid) && ContinuousClock.now < exitBound {
            reaped = waitpid(pid, &st, WNOHANG) == pid
            if !reaped { usleep(1_000) }
        }
        #expect(reaped || Self.isZombie(pid), "the killed run neither exited nor became a zombie in 10 s: \(Self.taskStates(pid))")
        let stale = try #require(mount, "the run never mounted")
        // Whatever happens below, the stuck process is released at the end
        // (its connection aborted), so that nothing waits for it for good.
        defer {
            if !reaped {
                umount2(stale, Int32(MNT_FORCE))
                umount2(stale, Int32(MNT_DETACH))
                _ = reap(pid, seconds: 10)
            }
        }
        // The next run: a case with a FUSE server whose verdict is the same on
        // every kernel (the MADV_DONTFORK control), so its status is 0.
        let o = try CLITests.cowpin("run", "--filter", "odirect-thread/read-dontfork-parent-writes/anon-page")
        #expect(o.status == 0, "stdout: \(o.stdout)\nstderr: \(o.stderr)")
        let leftMounted = Self.cowpinMounts.contains(stale)
        #expect(!leftMounted, "left mounted: \(stale); the killed run: \(Self.taskStates(pid))")
        // (A stat() of a mount whose connection is alive would wait for its stuck server.)
        if !leftMounted { #expect(!FileManager.default.fileExists(atPath: stale)) }
        let reapBound = ContinuousClock.now + .seconds(10)
        while !reaped && ContinuousClock.now < reapBound {
            reaped = waitpid(pid, &st, WNOHANG) == pid
            if !reaped { usleep(1_000) }
        }
        #expect(reaped, "the killed run did not exit: \(Self.taskStates(pid))")
    }

    /// Each thread of `pid`: its id, state, wait channel and pending signals (for a failure's message).
    static func taskStates(_ pid: pid_t) -> String {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.sorted().map { tid -> String in
            let dir = "/proc/\(pid)/task/\(tid)"
            let state = ((try? String(contentsOfFile: dir + "/stat", encoding: .utf8)) ?? "").split(separator: ")").last?.split(separator: " ").first ?? "?"
            let wchan = (try? String(contentsOfFile: dir + "/wchan", encoding: .utf8)) ?? "?"
            let pending = ((try? String(contentsOfFile: dir + "/status", encoding: .utf8)) ?? "").split(separator: "\n")
                .filter { $0.hasPrefix("SigPnd") || $0.hasPrefix("ShdPnd") }.map { $0.replacingOccurrences(of: "\t", with: " ") }
            return "\(tid) \(state) \(wchan) \(pending.joined(separator: " "))"
        }.joined(separator: "; ")
    }

    static func threadWaitsForFUSE(_ pid: pid_t) -> Bool {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.contains { (try? String(contentsOfFile: "/proc/\(pid)/task/\($0)/wchan", encoding: .utf8)) == "request_wait_answer" }
    }

    static func isZombie(_ pid: pid_t) -> Bool {
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
    }

    @Test("mounts and directories of a cowpin process that died are removed")
    func staleMountsRemoved() throws {
        if let why = Self.usable {
            recordSkip("\(why)")
            return
        }
        // A pid that is certainly dead: a child we reaped.
        let dead = Runner.exclusively { () -> Int32 in
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
