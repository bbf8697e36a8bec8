import Glibc
import SystemPackage
import SystemPackage

/// One `Supervisor.run`: hands the case runs of each phase to workers, reads
/// what they send, reaps the ones that end, and reports the results in the
/// order of the case runs.
final class Scheduler {
    /// A running worker, as the scheduler sees it.
    final class Slot {
        let pid: pid_t
        /// The write end of the worker's stdin (its commands); nil once closed.
        private(set) var commands: FileDescriptor?
        /// The read end of its fd 3 (its messages).
        let messages: FileDescriptor
        var pending: [UInt8] = []
        /// The case runs sent to it and not finished, in the order it runs them.
        var assigned: [Int] = []
        /// The case run it said it started, when, and the sequence number of
        /// the first kernel log record of the case (when the worker reads the log).
        var running: (number: Int, since: UInt64, kernelSeq: UInt64?)?
        var startedAny = false
        /// Why it gave up, when it said so before exiting (it could not start).
        var fatal: String?

        init(pid: pid_t, commands: FileDescriptor, messages: FileDescriptor) {
            self.pid = pid
            self.commands = commands
            self.messages = messages
        }

        /// Ends its commands: the worker cleans up and exits.
        func closeCommands() {
            try? commands?.close()
            commands = nil
        }
    }

    private let supervisor: Supervisor
    private let reporter: Reporter
    private let codec: WorkerCodec = WireCodec()
    private var totals = Totals()
    /// The reporter has its `begin`.
    private var began = false
    /// Results that finished before an earlier case run, by number.
    private var finished: [Int: CaseResult] = [:]
    private var nextToReport = 1
    private var slots: [Slot] = []
    private var deathsInARow = 0
    /// Set when workers died too often: why the remaining case runs are not run.
    private var givenUp: String?
    /// The case runs of the phase not sent to a worker yet.
    private var queue: ArraySlice<Int> = []
    /// Case runs that ran at the same time as each case run (`--jobs` > 1).
    private var overlaps: [Int: Set<Int>] = [:]

    init(_ supervisor: Supervisor, reporter: Reporter) {
        self.supervisor = supervisor
        self.reporter = reporter
    }

    func run() -> Totals {
        for phase in supervisor.phases() { run(phase) }
        // The workers clean up and exit when their commands end.
        for slot in slots { slot.closeCommands() }
        while !slots.isEmpty { receive(ended: true) }
        SystemState.shared.restore()
        begin(nil)
        reporter.end(totals)
        return totals
    }

    private func run(_ phase: Supervisor.Phase) {
        queue = phase.numbers[...]
        // The supervisor sets the phase's knobs; if it cannot, its cases
        // run one at a time and say why they cannot run themselves.
        var beside = false
        if let needs = phase.needs {
            beside = (try? supervisor.setUp(needs)) != nil
            if !beside { SystemState.shared.restore(caseOnly: true) }
        }
        let width = beside ? supervisor.jobs : 1
        while true {
            if let why = givenUp {
                for n in queue {
                    let (c, iteration) = supervisor.caseRun(n)
                    report(CaseResult(id: c.id, iteration: iteration, verdict: .error(why)), number: n)
                }
                queue = []
            }
            dispatch(width: width, beside: beside)
            if queue.isEmpty && !slots.contains(where: { !$0.assigned.isEmpty }) { break }
            if slots.isEmpty { continue }  // a worker could not be started: try again, or give up
            receive()
        }
        if beside { SystemState.shared.restore(caseOnly: true) }
    }

    /// Sends queued case runs to workers, each a few case runs ahead (its next
    /// one waits in its pipe, not for a round trip); at most `width` have any.
    private func dispatch(width: Int, beside: Bool) {
        while let n = queue.first {
            let busy = slots.filter { !$0.assigned.isEmpty }
            var slot = busy.count < width ? slots.first { $0.assigned.isEmpty } : nil
            if slot == nil && busy.count < width && slots.count < supervisor.jobs {
                let new: Slot
                do {
                    new = try supervisor.spawn()
                } catch {
                    let why = "could not be started: \(error.name)"
                    fputs("cowpin: a worker \(why)\n", stderr)
                    died("it \(why)")
                    break
                }
                slots.append(new)
                slot = new
            }
            guard let slot = slot ?? busy.filter({ $0.assigned.count < Supervisor.ahead }).min(by: { $0.assigned.count < $1.assigned.count })
            else { break }
            let line = Array("\(n) \(beside ? "beside" : "alone")\n".utf8)
            let sent = (try? line.withUnsafeBytes { try slot.commands?.write($0) }) == line.count
            // A worker that cannot take it is dead: its end of file comes next.
            guard sent else { break }
            slot.assigned.append(n)
            queue.removeFirst()
        }
    }

    private func begin(_ probe: Probe?) {
        guard !began else { return }
        began = true
        reporter.begin(planned: supervisor.planned, probe: probe ?? .current())
    }

    /// Reports `r` and every result after it that waited for it.
    private func report(_ r: CaseResult, number: Int) {
        finished[number] = r
        while let next = finished.removeValue(forKey: nextToReport) {
            deliver(next, number: nextToReport)
            nextToReport += 1
        }
    }

    // Not inlined into `report`: Swift 6.3's optimizer (CopyPropagation)
    // aborts on the verdict switch inlined into that loop.
    @inline(never)
    private func deliver(_ r: CaseResult, number: Int) {
        begin(nil)
        totals.add(r.verdict.kind)
        reporter.finished(r, number: number)
    }

    /// The kernel log of a case run, naming the case runs that ran at the same
    /// time: kernel messages cannot say which of them the kernel was in, so
    /// each of them has them.
    private func concurrent(_ log: CaseKernelLog?, number: Int) -> CaseKernelLog? {
        let others = overlaps.removeValue(forKey: number) ?? []
        guard var log, !others.isEmpty else { return log }
        log.concurrent = others.sorted().map { n in
            let (c, iteration) = supervisor.caseRun(n)
            return supervisor.options.repeatCount > 1 ? "\(c.id) (run \(iteration))" : c.id
        }
        return log
    }

    private func handle(_ m: WorkerMessage, from slot: Slot) {
        if let p = m.probe { begin(p) }
        if let f = m.fatal { slot.fatal = f }
        if let n = m.started {
            slot.running = (n, monotonicNs(), m.kmsg)
            for other in slots where other !== slot {
                guard let o = other.running?.number else { continue }
                overlaps[n, default: []].insert(o)
                overlaps[o, default: []].insert(n)
            }
        }
        if let w = m.result {
            slot.running = nil
            slot.assigned.removeAll { $0 == w.number }
            slot.startedAny = true
            deathsInARow = 0
            var r = w.caseResult
            r.kernel = concurrent(r.kernel, number: w.number)
            report(r, number: w.number)
        }
    }

    /// Reaps a worker whose messages ended: reports its case as an error
    /// when it was in one, restores what it left, and counts the death
    /// unless it exited 0 after its commands ended (`ended`).
    private func reap(_ slot: Slot, ended: Bool) {
        slots.removeAll { $0 === slot }
        try? slot.messages.close()
        slot.closeCommands()
        let outcome = supervisor.wait(for: slot.pid)
        if ended && outcome.finished && slot.assigned.isEmpty { return }
        let death = outcome.description + (slot.fatal.map { " (\($0))" } ?? ""), hint = outcome.hint
        let restored = Supervisor.recover()
        let during = slot.running.map { " during \(supervisor.caseRun($0.number).c.id)" }
            ?? (ended ? " after the last case" : slot.startedAny ? " between cases" : " before its first case")
        var note = "cowpin: the worker (pid \(slot.pid)) \(death)\(during)\(hint)"
        note += restored.isEmpty ? "" : "; restored what it left: \(restored.joined(separator: "; "))"
        fputs(note + "\n", stderr)
        if let r = slot.running {
            let (c, iteration) = supervisor.caseRun(r.number)
            // What the kernel said since the case started (why it killed the
            // worker, an oops in its system call): the worker cannot tell any more.
            let log = r.kernelSeq.map { CaseKernelLog(KernelLogReader.records(from: $0)) }.flatMap { $0.isEmpty ? nil : $0 }
            let verdict = Verdict.error("the cowpin worker \(death) during this case\(hint)").withKernelReports(log?.reports ?? [])
            report(CaseResult(id: c.id, iteration: iteration, verdict: verdict, durationNs: monotonicNs() - r.since,
                              kernel: concurrent(log, number: r.number)), number: r.number)
            slot.assigned.removeAll { $0 == r.number }
        }
        // What it was sent and had not started goes to the next worker.
        queue = (slot.assigned + queue).sorted()[...]
        if !ended { died("it \(death)\(during)") }
    }

    private func died(_ what: String) {
        deathsInARow += 1
        if deathsInARow >= Supervisor.maxDeathsInARow && givenUp == nil {
            givenUp = "not run: the cowpin worker died \(deathsInARow) times in a row without finishing a case (last: \(what))"
        }
    }

    /// Reads what the workers sent, waiting for the next message; reaps the ones that ended.
    private func receive(ended: Bool = false) {
        var fds = slots.map { pollfd(fd: $0.messages.rawValue, events: Int16(POLLIN), revents: 0) }
        guard !fds.isEmpty else { return }
        let r = poll(&fds, nfds_t(fds.count), Supervisor.livenessMs)
        if r < 0 { return }  // EINTR: look again
        if r == 0 {
            // No message for a while. A worker that is dying (SIGKILLed) may
            // not get to close its pipe: a thread of it waits for the answer of
            // its own FUSE server, which died with it. Abort that connection.
            if slots.contains(where: { FuseServer.ownerGone($0.pid) }) { FuseServer.removeStale() }
            return
        }
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        for (i, slot) in slots.enumerated().reversed() where fds[i].revents != 0 {
            // EINTR is retried; an error or the end of file: the worker is gone.
            let n = (try? chunk.withUnsafeMutableBytes { try slot.messages.read(into: $0) }) ?? 0
            if n == 0 {
                reap(slot, ended: ended)
                continue
            }
            slot.pending += chunk[0..<n]
            var start = 0
            while let nl = slot.pending[start...].firstIndex(of: 10) {
                if let m = codec.decode(slot.pending[start..<nl]) { handle(m, from: slot) }
                start = nl + 1
            }
            slot.pending.removeFirst(start)
        }
    }
}
