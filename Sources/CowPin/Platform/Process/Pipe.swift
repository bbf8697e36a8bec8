import CCowPin
import Glibc
import SystemPackage

/// A pipe (O_CLOEXEC). Both ends close on release.
public final class OSPipe {
    private var read: FileDescriptor?
    private var write: FileDescriptor?

    public init() throws {
        do {
            (read, write) = try FileDescriptor.pipe(options: .closeOnExec)
        } catch {
            throw SyscallError("pipe2", error)
        }
    }

    /// The read end's number, for the shim and the child's program; -1 once closed.
    public var readEnd: Int32 { read?.rawValue ?? -1 }
    /// The write end's number; -1 once closed.
    public var writeEnd: Int32 { write?.rawValue ?? -1 }

    deinit { close() }

    public func close() {
        closeRead()
        closeWrite()
    }

    public func closeRead() {
        try? read?.close()
        read = nil
    }

    public func closeWrite() {
        try? write?.close()
        write = nil
    }
}

/// Pipes that together can hold a whole region for vmsplice(): one pipe when
/// F_SETPIPE_SZ grants the region's size, else several of the largest size
/// allowed (fs.pipe-max-size without CAP_SYS_RESOURCE), each covering a range.
public final class SplicePipes {
    public let pipes: [OSPipe]
    public let ranges: [Range<Int>]

    public init(covering size: Int, pageSize: Int) throws {
        var pipes: [OSPipe] = []
        var ranges: [Range<Int>] = []
        var offset = 0
        var chunk = size
        while offset < size {
            let p = try OSPipe()
            var granted: Int?
            while granted == nil {
                let r = cp_set_pipe_size(p.writeEnd, Int32(min(chunk, size - offset)))
                if r >= 0 {
                    granted = Int(r)
                } else if r == -EPERM && chunk > pageSize {
                    chunk = max(pageSize, min(chunk / 2, Self.pipeMaxSize() ?? chunk / 2))
                } else {
                    throw SyscallError("fcntl(F_SETPIPE_SZ, \(chunk))", result: Int(r))
                }
            }
            let len = min(granted!, size - offset)
            pipes.append(p)
            ranges.append(offset..<(offset + len))
            offset += len
            guard pipes.count <= 8 else { throw CaseSkip("a \(size)-byte region needs more than 8 pipes of \(len) bytes for vmsplice") }
        }
        self.pipes = pipes
        self.ranges = ranges
    }

    static func pipeMaxSize() -> Int? {
        readFile("/proc/sys/fs/pipe-max-size").flatMap { Int($0.split(separator: "\n").first ?? "") }
    }

    /// vmsplice() the region from the calling process.
    public func splice(_ region: Region) throws {
        for (p, r) in zip(pipes, ranges) {
            let n = try check("vmsplice", cp_vmsplice(p.writeEnd, region.base + r.lowerBound, r.count))
            guard n == r.count else { throw HarnessError("vmsplice moved \(n) of \(r.count) bytes") }
        }
    }

    /// Reads back everything the pipes hold, in region order (bounded waits),
    /// into reused memory, and passes it to `body` (valid only during the call).
    /// A pipe that holds less than was spliced into it is a harness error.
    public func withContents<R>(timeoutMs: Int32, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let total = ranges.last?.upperBound ?? 0
        let buffer = try SharedBuffer(size: total)
        for (p, r) in zip(pipes, ranges) {
            let n = try check("read(pipe, \(r.count) bytes)", cp_read_full(p.readEnd, buffer.base + r.lowerBound, r.count, timeoutMs))
            guard n == r.count else { throw HarnessError("a pipe held \(n) bytes, \(r.count) were vmsplice()d into it") }
        }
        return try body(UnsafeRawBufferPointer(start: buffer.base, count: total))
    }
}
