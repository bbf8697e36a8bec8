import CCowPin
import Glibc
import SystemPackage

/// cowpin's own FUSE file system, served over the raw /dev/fuse protocol from
/// a thread of this process. It has one file, `data`, opened with
/// FOPEN_DIRECT_IO, whose content is a pattern of its own (`readData`).
///
/// One server per process serves case after case (`forCase`): mounting costs
/// more than most scenarios that use it. Between cases it is reset; a case
/// that leaves it in a doubtful state (a request held, a timeout, a failure)
/// gets it shut down, and the next case mounts a fresh one. It is shut down
/// when the cases are done, at exit, or on SIGINT/SIGTERM (`Emergency`);
/// after a SIGKILL the next run removes it (`removeStale`: the mountpoint
/// names the owner's pid).
///
/// The point is exact control over the two moments that matter for pins:
/// - a READ can be held: the kernel keeps the reader's pages pinned until the
///   case releases the request and the reply's data is copied into them;
/// - the server can stop reading /dev/fuse (the gate): a WRITE request then
///   sits queued with the writer's pages pinned, and the kernel copies the
///   data out of those pages only when the gate opens and the server reads it.
public final class FuseServer {
    public static let fileName = "data"
    public static let fileSize = 4 << 20
    static let rootNode: UInt64 = 1
    static let fileNode: UInt64 = 2
    static let maxWrite = 1 << 20
    static let mountPrefix = "cowpin-fuse-"

    public let mountpoint: String
    public var filePath: String { mountpoint + "/" + Self.fileName }
    /// What READ returns at each file offset (set for each case).
    public var readData: Content { state.with { $0.readData } }
    /// The bound of every wait (the current case's).
    var timeoutMs: Int32
    let devFD: FileDescriptor
    let commands: OSPipe
    let events: OSPipe
    let state = Locked(State(readData: .zero))
    var serving = false
    var emergency = 0
    var mounted = false

    struct State {
        var readData: Content
        var holdReads = false
        var gateOpen = true
        var heldRead: (unique: UInt64, offset: Int, size: Int)?
        var writes: [(offset: Int, data: [UInt8])] = []
        var failure: String?
        /// Opcodes of the requests read so far, for diagnostics.
        var seen: [UInt32] = []
        /// How many had been read when the gate last closed.
        var seenAtGate = 0
        /// Files opened (OPEN answered) and released (RELEASE) on this
        /// connection: equal once no file of an earlier case is in use.
        var opens = 0, releases = 0
        /// The file handle the next OPEN gets; handles below `caseHandles`
        /// belong to files of earlier cases.
        var nextHandle: UInt64 = 1
        var caseHandles: UInt64 = 1
        /// READ and WRITE requests on a file of an earlier case (answered, never held or recorded).
        var strays = 0
        /// Why this server must not serve another case (a wait that timed out, ...).
        var doubt: String?
    }

    /// Events from the server thread.
    enum Event: UInt8 {
        case initialized = 0x69, readHeld = 0x72, writeReceived = 0x77, gateClosed = 0x67, released = 0x6C, exited = 0x78
    }

    static func readData(seed: UInt32) -> Content {
        .pattern(seed: seed ^ 0x5EED_F00D, label: "the read data (from the FUSE server)")
    }

    // MARK: - one server per process

    /// The process's server, between cases.
    static let shared = Locked<FuseServer?>(nil)
    static let exitHook = Locked(false)
    /// How long a new case waits for the files of the previous one to be
    /// released (a RELEASE is sent asynchronously after the last close).
    static let settleMs: Int32 = 500

    /// The server for a case that starts: the process's server, reset, when
    /// the previous case left it idle; else a newly mounted one.
    public static func forCase(seed: UInt32, timeoutMs: Int32) throws -> FuseServer {
        try shared.with { slot in
            if let s = slot {
                if s.settle(timeoutMs: min(timeoutMs, settleMs)) == nil {
                    s.reset(seed: seed, timeoutMs: timeoutMs)
                    return s
                }
                s.shutdown()
                slot = nil
            }
            let s = try FuseServer(seed: seed, timeoutMs: timeoutMs)
            slot = s
            let first = exitHook.with { hooked -> Bool in
                defer { hooked = true }
                return !hooked
            }
            if first { atexit { FuseServer.shutdownShared() } }
            return s
        }
    }

    /// A case that used `server` ends (its children are gone, its file is
    /// closed): a server left in a doubtful state is shut down, so that the
    /// next case mounts a fresh one. Returns why, when it was.
    @discardableResult
    public static func endCase(_ server: FuseServer) -> String? {
        shared.with { slot in
            guard let why = server.doubtfulState() else { return nil }
            server.shutdown()
            if slot === server { slot = nil }
            return why
        }
    }

    /// Shuts the process's server down (the cases are done, or the process exits).
    public static func shutdownShared() {
        shared.with { slot in
            slot?.shutdown()
            slot = nil
        }
    }

    /// The mountpoint of the process's server, if one is mounted.
    public static var sharedMountpoint: String? { shared.with { $0.map(\.mountpoint) } }

    /// Why the server must not serve another case; nil when it is idle:
    /// serving, no READ held or about to be, the gate open, no wait that
    /// timed out, nothing from another case's file.
    func doubtfulState() -> String? {
        guard serving && mounted else { return "the server is stopped" }
        return state.with { s -> String? in
            if let f = s.failure { return "the server failed: \(f)" }
            if let d = s.doubt { return d }
            if s.heldRead != nil { return "a READ is still held" }
            if s.holdReads { return "a READ hold was armed but no READ came" }
            if !s.gateOpen { return "the gate is closed" }
            if s.strays > 0 { return "\(s.strays) request(s) on an earlier case's file" }
            return nil
        }
    }

    /// Waits (bounded) until every file opened on this connection is
    /// released: no I/O of an earlier case can be in flight then, nor reach
    /// the server later. Nil when settled, else why not.
    func settle(timeoutMs: Int32) -> String? {
        if let why = doubtfulState() { return why }
        let deadline = monotonicNs() + UInt64(timeoutMs) * 1_000_000
        while true {
            let (opens, releases) = state.with { ($0.opens, $0.releases) }
            if opens == releases { return nil }
            let now = monotonicNs()
            guard now < deadline else {
                return "\(opens - releases) file(s) of an earlier case not released within \(timeoutMs) ms"
            }
            var v: UInt8 = 0
            let r = cp_await_value(events.readEnd, Int32((deadline - now) / 1_000_000), &v)
            if r == -ETIMEDOUT { continue }
            if r != 0 || v == Event.exited.rawValue { return "the server stopped" }
        }
    }

    /// Starts a new case on a settled server: its read data, and nothing
    /// left of the previous case (state, events, file handles).
    func reset(seed: UInt32, timeoutMs: Int32) {
        self.timeoutMs = timeoutMs
        state.with { s in
            s.readData = Self.readData(seed: seed)
            s.holdReads = false
            s.heldRead = nil
            s.writes = []
            s.seen = []
            s.seenAtGate = 0
            s.caseHandles = s.nextHandle
            s.strays = 0
        }
        // Events of the previous case (bounded: the server is idle, and the pipe holds what was written).
        var v: UInt8 = 0, drained = 0
        while drained < 4096 && cp_await_value(events.readEnd, 0, &v) == 0 { drained += 1 }
    }

    /// Mounts a new instance on a private directory and starts serving.
    init(seed: UInt32, timeoutMs: Int32) throws {
        self.timeoutMs = timeoutMs
        state.with { $0.readData = Self.readData(seed: seed) }
        Self.removeStale()
        var template = Array("/tmp/\(Self.mountPrefix)\(getpid())-XXXXXX".utf8CString)
        guard let dir = mkdtemp(&template) else { throw SyscallError("mkdtemp(/tmp)", errno: errno) }
        mountpoint = String(cString: dir)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open("/dev/fuse", .readWrite, options: .closeOnExec)
        } catch {
            rmdir(mountpoint)
            throw SyscallError("open(/dev/fuse)", error)
        }
        devFD = fd
        commands = try OSPipe()
        events = try OSPipe()
        let options = "fd=\(fd.rawValue),rootmode=40000,user_id=\(getuid()),group_id=\(getgid())"
        if mount("cowpin", mountpoint, "fuse", UInt(MS_NOSUID | MS_NODEV), options) != 0 {
            let e = errno
            try? fd.close()
            rmdir(mountpoint)
            if e == EPERM { throw CaseSkip("mounting FUSE needs CAP_SYS_ADMIN (mount(2) returned EPERM)") }
            throw SyscallError("mount(fuse, \(mountpoint))", errno: e)
        }
        mounted = true
        let (point, dev) = (mountpoint, fd)
        emergency = Emergency.add("unmounted \(point)") {
            try? dev.close()
            umount2(point, Int32(MNT_DETACH))
            rmdir(point)
        }
        serving = true
        do { try startThread { [self] in serve() } } catch {
            serving = false
            throw error
        }
    }

    deinit { shutdown() }

    // MARK: - control, from the case

    /// Opens the file (O_DIRECT); the server answers LOOKUP and OPEN meanwhile.
    /// Before returning, it makes the kernel stop sending FLUSH and POLL (both
    /// answered ENOSYS once), so that during a hold the only request in the
    /// queue is the case's READ or WRITE: io_uring polls a pollable file
    /// before it writes, and every close() (a child's exit too) flushes.
    public func openFile() throws -> Int32 {
        // These calls wait for the server's answers inside the kernel, where
        // no timeout applies: make them on a helper thread and bound the wait.
        let done = try OSPipe()
        let outcome = Locked<(fd: Int32, err: Int32)?>(nil)
        let path = filePath, pollMs = timeoutMs
        try startThread {
            let fd = open(path, O_RDWR | Int32(CP_O_DIRECT) | O_CLOEXEC)
            let err = errno
            if fd >= 0 {
                var p = pollfd(fd: fd, events: Int16(POLLIN | POLLOUT), revents: 0)
                _ = poll(&p, 1, pollMs)
                // close() of a duplicate flushes without releasing the file (a
                // RELEASE is sent asynchronously and could land in a later hold).
                try? FileDescriptor(rawValue: fd).duplicate().close()
            }
            outcome.with { $0 = (fd, err) }
            cp_signal(done.writeEnd)
        }
        let r = cp_await(done.readEnd, timeoutMs)
        if r == -ETIMEDOUT {
            shutdown() // aborts the connection: the helper's calls fail and it ends
            throw HarnessError("FUSE: opening \(filePath) got no answer within \(timeoutMs) ms (connection aborted)")
        }
        try check("wait for open(\(filePath))", r)
        guard let o = outcome.with({ $0 }), o.fd >= 0 else {
            throw SyscallError("open(\(filePath), O_DIRECT)", errno: outcome.with { $0?.err } ?? EIO)
        }
        return o.fd
    }

    /// The next READ request is held until `releaseRead()`.
    public func holdNextRead() { state.with { $0.holdReads = true } }

    /// Waits (bounded) until a READ is held: the reader's pages are pinned now.
    @discardableResult
    public func awaitHeldRead() throws -> (offset: Int, size: Int) {
        try awaitEvent(.readHeld, "a READ request")
        guard let r = state.with({ $0.heldRead }) else { throw doubt("FUSE: no READ held") }
        return (r.offset, r.size)
    }

    /// Answers the held READ with `readData`.
    public func releaseRead() throws { try command(0x52) }

    /// Stops reading /dev/fuse; returns once the server thread acknowledged it.
    public func closeGate() throws {
        state.with {
            $0.gateOpen = false
            $0.seenAtGate = $0.seen.count
        }
        try command(0x47)
        try awaitEvent(.gateClosed, "the gate to close")
    }

    /// Waits (bounded) until a request is queued on /dev/fuse (the gate being
    /// closed, nobody reads it): for a WRITE, the writer's pages are pinned.
    public func awaitQueuedRequest() throws {
        let r = cp_wait_readable(devFD.rawValue, timeoutMs)
        if r == -ETIMEDOUT { throw doubt("FUSE: no request queued within \(timeoutMs) ms") }
        try check("poll(/dev/fuse)", r)
    }

    /// Lets the server read requests again.
    public func openGate() throws {
        state.with { $0.gateOpen = true }
        try command(0x4F)
    }

    /// Waits (bounded) for the next WRITE; returns what the server received.
    /// After a closed gate, the WRITE must be the first request read: else the
    /// request that waited was another one, and the hold pinned nothing.
    public func awaitWrite() throws -> (offset: Int, data: [UInt8]) {
        try awaitEvent(.writeReceived, "a WRITE request")
        let (seen, at) = state.with { ($0.seen, $0.seenAtGate) }
        if at < seen.count, seen[at] != FUSE_WRITE.rawValue {
            throw doubt("FUSE: the request held at the gate was \(Self.opcodeName(seen[at])), not the WRITE")
        }
        guard let w = state.with({ $0.writes.isEmpty ? nil : $0.writes.removeFirst() }) else {
            throw doubt("FUSE: no WRITE recorded")
        }
        return w
    }

    /// Stops the server, aborts the connection (failing anything in flight),
    /// unmounts and removes the directory. Idempotent.
    public func shutdown() {
        if serving {
            serving = false
            _ = try? command(0x51)
            _ = try? awaitEvent(.exited, "the server thread to exit")
        }
        if mounted {
            abortConnection()
            umount2(mountpoint, Int32(MNT_DETACH))
            rmdir(mountpoint)
            mounted = false
            try? devFD.close()
            Emergency.remove(emergency)
        }
    }

    func command(_ c: UInt8) throws {
        var b = c
        guard write(commands.writeEnd, &b, 1) == 1 else { throw SyscallError("write(server command)", errno: errno) }
    }

    func awaitEvent(_ e: Event, _ what: String) throws {
        let deadline = monotonicNs() + UInt64(timeoutMs) * 1_000_000
        while true {
            let now = monotonicNs()
            let left = now >= deadline ? 0 : Int32((deadline - now) / 1_000_000)
            var v: UInt8 = 0
            let r = cp_await_value(events.readEnd, left, &v)
            if r == -ETIMEDOUT {
                let seen = state.with { $0.seen }.map(Self.opcodeName).joined(separator: " ")
                throw doubt("FUSE: waited \(timeoutMs) ms for \(what) (requests read so far: \(seen))")
            }
            try check("wait for the FUSE server", r)
            if v == e.rawValue { return }
            if v == Event.exited.rawValue {
                throw HarnessError("FUSE server stopped: \(state.with { $0.failure } ?? "no reason")")
            }
        }
    }

    /// An error that leaves the server doubtful: it serves no other case.
    func doubt(_ message: String) -> HarnessError {
        state.with { s in if s.doubt == nil { s.doubt = message } }
        return HarnessError(message)
    }

    func notify(_ e: Event) {
        var b = e.rawValue
        _ = write(events.writeEnd, &b, 1)
    }
}
