import Glibc
import SystemPackage

/// The worker's reporter: writes `WorkerMessage`s to the supervisor's pipe, one a line.
public final class WorkerChannel: Reporter {
    /// The fd the supervisor gives the worker for its messages.
    public static let fd: Int32 = 3
    private let out = FileDescriptor(rawValue: WorkerChannel.fd)
    let codec: WorkerCodec = WireCodec()

    public init() {}

    /// SIGTERM to this process (the signal thread cleans up and exits); this thread waits for that.
    static func supervisorGone() -> Never {
        kill(getpid(), SIGTERM)
        while true { pause() }
    }

    func send(_ m: WorkerMessage) {
        var bytes = codec.encode(m)
        bytes.append(10)
        // EINTR is retried; a pipe without a reader (EPIPE) means the supervisor died.
        do {
            _ = try out.writeAll(bytes)
        } catch {
            Self.supervisorGone()
        }
    }

    public func begin(planned: Int, probe: Probe) { send(WorkerMessage(probe: probe)) }

    /// Tells the supervisor why this worker cannot go on, before it exits.
    public func fatal(_ why: String) { send(WorkerMessage(fatal: why)) }

    public func started(_ c: Case, iteration: Int, number: Int) { started(number: number, kernelSeq: nil) }

    /// A case run starts; its kernel log records start at `kernelSeq` (when
    /// the worker reads the log): the supervisor reads them when the worker dies in it.
    public func started(number: Int, kernelSeq: UInt64?) {
        var m = WorkerMessage(started: number)
        m.kmsg = kernelSeq
        send(m)
    }

    public func finished(_ r: CaseResult, number: Int) { send(WorkerMessage(result: WorkerResult(r, number: number))) }

    public func end(_ totals: Totals) {}
}
