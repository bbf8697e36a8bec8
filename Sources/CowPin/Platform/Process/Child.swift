import CCowPin
import Glibc

/// What a child does after fork(), written down before fork() and run by the
/// C interpreter (the child may not run Swift: the parent is multi-threaded).
public struct ChildProgram {
    var ops: [cp_op] = []
    var names: [String] = []
    /// Bound for the child's own waits (ms).
    var timeoutMs: Int64 = 10_000
    /// Set by `Child`: the pipes of the checkpoint handshake.
    var toParent: Int32 = -1
    var fromParent: Int32 = -1

    init() {}

    mutating func add(_ name: String, _ kind: cp_op_kind, fd: Int32 = -1, addr: UnsafeMutableRawPointer? = nil,
                      addr2: UnsafeMutableRawPointer? = nil, len: Int = 0, arg: Int64 = 0) {
        ops.append(cp_op(kind: kind.rawValue, fd: fd, addr: addr, addr2: addr2, len: UInt64(len), arg: arg))
        names.append(name)
    }

    /// Tell the parent we are here, and wait until it says go on.
    public mutating func checkpoint() {
        add("signal parent", CP_OP_SIGNAL, fd: toParent)
        add("wait for parent", CP_OP_AWAIT, fd: fromParent, arg: timeoutMs)
    }

    /// Wait for a byte on `pipe` (a hold point), at most `timeoutMs` (default: the case's bound).
    public mutating func wait(for pipe: OSPipe, timeoutMs: Int64? = nil) {
        add("wait for pipe", CP_OP_AWAIT, fd: pipe.readEnd, arg: timeoutMs ?? self.timeoutMs)
    }

    /// Write `byte` over the region (or `range` of it), in the child's view.
    public mutating func write(_ byte: UInt8, to region: Region, range: Range<Int>? = nil) {
        let r = range ?? 0..<region.size
        add("write 0x\(hex(byte))", CP_OP_FILL, addr: region.base + r.lowerBound, len: r.count, arg: Int64(byte))
    }

    /// The child checks its view of the region (or of `range`) in place
    /// against `expected`, and copies it into `report` only when it differs.
    public mutating func verify(_ region: Region, holds expected: Layout, report: ChildReport, range: Range<Int>? = nil) {
        let r = range ?? 0..<region.size
        precondition(report.size == region.size)
        let header = report.prepare(expected, range: r)
        add("verify", CP_OP_VERIFY, addr: region.base + r.lowerBound, addr2: UnsafeMutableRawPointer(header), len: r.count)
    }

    public mutating func verify(_ region: Region, holds expected: Content, report: ChildReport, range: Range<Int>? = nil) {
        verify(region, holds: Layout(expected), report: report, range: range)
    }

    public mutating func unmap(_ region: Region) {
        add("munmap", CP_OP_MUNMAP, addr: region.base, len: region.size)
    }

    public mutating func mprotect(_ region: Region, _ prot: Int32) {
        add("mprotect(\(prot))", CP_OP_MPROTECT, addr: region.base, len: region.size, arg: Int64(prot))
    }

    /// vmsplice() the region into pipes (R/O pins held by the pipes).
    public mutating func vmsplice(_ region: Region, into pipes: SplicePipes) {
        for (pipe, range) in zip(pipes.pipes, pipes.ranges) {
            add("vmsplice", CP_OP_VMSPLICE, fd: pipe.writeEnd, addr: region.base + range.lowerBound, len: range.count)
        }
    }

    /// Reads back what the pipes hold into `report` (at the region offsets
    /// they cover), and checks it there against `expected`.
    public mutating func verify(_ pipes: SplicePipes, hold expected: Content, report: ChildReport) {
        for (pipe, range) in zip(pipes.pipes, pipes.ranges) {
            precondition(report.size >= range.upperBound)
            add("read pipe", CP_OP_READ, fd: pipe.readEnd, addr2: report.data(at: range.lowerBound), len: range.count, arg: timeoutMs)
        }
        let whole = (pipes.ranges.first?.lowerBound ?? 0)..<(pipes.ranges.last?.upperBound ?? 0)
        let header = report.prepare(Layout(expected), range: whole)
        add("verify", CP_OP_VERIFY, addr: report.data(at: whole.lowerBound), addr2: UnsafeMutableRawPointer(header), len: whole.count)
    }
}

/// A forked child running a `ChildProgram`. Every wait is bounded; a child
/// that does not finish in time is killed and reaped.
public final class Child {
    public let pid: Int32
    private var pidfd: Int32
    private let toParent: OSPipe
    private let fromParent: OSPipe
    private let status: SharedBuffer
    private let names: [String]
    private let timeoutMs: Int32
    private(set) var reaped = false {
        didSet { if reaped { Emergency.remove(emergency) } }
    }
    private var emergency = 0

    /// Forks; `build` writes the child's program.
    init(timeoutMs: Int32, _ build: (inout ChildProgram) throws -> Void) throws {
        toParent = try OSPipe()
        fromParent = try OSPipe()
        status = try SharedBuffer(size: MemoryLayout<cp_child_status>.size)
        var program = ChildProgram()
        program.timeoutMs = Int64(timeoutMs)
        program.toParent = toParent.writeEnd
        program.fromParent = fromParent.readEnd
        try build(&program)
        guard program.ops.count <= Int(CP_MAX_OPS) else { throw HarnessError("child program too long") }
        self.names = program.names
        self.timeoutMs = timeoutMs
        var pid: Int32 = 0
        var pidfd: Int32 = -1
        let st = status.base.assumingMemoryBound(to: cp_child_status.self)
        try check("fork", program.ops.withUnsafeBufferPointer { cp_spawn($0.baseAddress, $0.count, st, &pid, &pidfd) })
        self.pid = pid
        self.pidfd = pidfd
        // Killed and reaped (bounded): a child left unreaped when this process
        // exits would be a zombie under PID 1, which need not reap it.
        emergency = Emergency.add("killed child \(pid)") {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            for _ in 0..<2000 {
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid || (r < 0 && errno != EINTR) { break }
                usleep(1_000)
            }
        }
        // Only the child writes here: a dead child then reads as end of file.
        toParent.closeWrite()
        fromParent.closeRead()
    }

    deinit {
        if !reaped {
            cp_kill_reap(pid, pidfd)
            Emergency.remove(emergency)
        }
    }

    private var statusBlock: cp_child_status {
        status.base.assumingMemoryBound(to: cp_child_status.self).pointee
    }

    /// Result of the child's operation `index` (e.g. bytes vmspliced).
    public func result(ofOperation index: Int) -> Int64 {
        withUnsafeBytes(of: statusBlock.result) { $0.load(fromByteOffset: index * 8, as: Int64.self) }
    }

    /// Results of every operation named `name`, in program order.
    public func results(of name: String) -> [Int64] {
        names.indices.filter { names[$0] == name }.map { result(ofOperation: $0) }
    }

    /// Waits (bounded) until the child reaches its next checkpoint.
    public func awaitCheckpoint() throws {
        let r = cp_await(toParent.readEnd, timeoutMs)
        if r == 0 { return }
        if r == -EPIPE { try finish(); throw HarnessError("child exited before its checkpoint") }
        if r == -ETIMEDOUT {
            kill()
            throw HarnessError("child did not reach its checkpoint within \(timeoutMs) ms (killed)")
        }
        throw SyscallError("wait for child", result: Int(r))
    }

    /// Lets the child go on past its checkpoint.
    public func resume() throws {
        try check("signal child", cp_signal(fromParent.writeEnd))
    }

    /// Waits (bounded) for the child to exit and checks that its program ran.
    public func finish() throws {
        guard !reaped else { return }
        var ws: Int32 = 0
        let r = cp_reap(pid, pidfd, timeoutMs, &ws)
        reaped = true
        if r == -ETIMEDOUT { throw HarnessError("child \(pid) did not exit within \(timeoutMs) ms (killed)") }
        try check("waitpid", r)
        if cp_wifsignaled(ws) != 0 {
            let sig = cp_wtermsig(ws)
            throw HarnessError("child killed by signal \(sig) (\(signalName(sig))) after \(statusBlock.done) of \(names.count) steps")
        }
        let code = cp_wexitstatus(ws)
        if code == CP_CHILD_OP_FAILED {
            let i = Int(statusBlock.failed_op)
            let name = names.indices.contains(i) ? names[i] : "#\(i)"
            throw HarnessError("child step \(i) (\(name)) failed: \(SyscallError(name, errno: statusBlock.failed_errno))")
        }
        if code != 0 { throw HarnessError("child exited with status \(code)") }
    }

    /// SIGKILL and reap (bounded).
    public func kill() {
        guard !reaped else { return }
        cp_kill_reap(pid, pidfd)
        reaped = true
    }
}
