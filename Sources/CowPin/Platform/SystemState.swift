import CCowPin
import Glibc
import SystemPackage

/// Everything cowpin changes outside its own process (sysfs knobs, hugetlb
/// pools, ...) goes through here. Each change is written to a journal before
/// it is made, so it is undone when the case ends, when the run is
/// interrupted (SIGINT/SIGTERM), and, after a SIGKILL, by the next run.
public final class SystemState: @unchecked Sendable {
    public static let shared = SystemState()

    /// Where journals live: one file per running cowpin process.
    public static var directory: String {
        access("/run", W_OK) == 0 ? "/run/cowpin" : "/var/tmp/cowpin"
    }

    /// The cross-process lock: one for the machine, whoever runs. Root and
    /// non-root runs keep their journals apart (a non-root process cannot
    /// write /run), but they must serialize on one lock, or a root run changes
    /// the knobs a non-root run's cases depend on. /dev/shm is a tmpfs every
    /// user can create in (sticky).
    public static var lockPath: String {
        var st = stat()
        return stat("/dev/shm", &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR ? "/dev/shm/cowpin.lock" : directory + "/lock"
    }

    /// Opens the lock file whoever created it: read-write if we may, else
    /// read-only (flock needs no write access), created (0644) if missing.
    /// Without O_CREAT first: in a sticky directory fs.protected_regular
    /// refuses O_CREAT of a file another user owns.
    static func openLock() -> FileDescriptor? {
        let path = FilePath(lockPath)
        mkdir(directory, 0o700)
        for mode in [FileDescriptor.AccessMode.readWrite, .readOnly] {
            do {
                return try FileDescriptor.open(path, mode, options: .closeOnExec)
            } catch Errno.noSuchFileOrDirectory {
                break
            } catch {}
        }
        if let fd = try? FileDescriptor.open(path, .readWrite, options: [.create, .closeOnExec], permissions: [.ownerReadWrite, .groupRead, .otherRead]) {
            fchmod(fd.rawValue, 0o644)
            return fd
        }
        return try? FileDescriptor.open(path, .readOnly, options: .closeOnExec)
    }

    /// One undoable change, as a journal line.
    enum Change {
        /// A sysfs/procfs value and what it held before.
        case knob(path: String, old: String)
        /// A zram swap device cowpin created and enabled.
        case zramSwap(device: Int)

        var line: String {
            switch self {
            case .knob(let p, let old): return "knob\t\(p)\t\(old)"
            case .zramSwap(let n): return "zram\t\(n)"
            }
        }

        func isKnob(_ path: String) -> Bool {
            if case .knob(path, _) = self { return true }
            return false
        }

        init?(line: Substring) {
            let f = line.split(separator: "\t", maxSplits: 2, omittingEmptySubsequences: false)
            switch (f.first, f.count) {
            case ("knob", 3): self = .knob(path: String(f[1]), old: String(f[2]))
            case ("zram", 2): guard let n = Int(f[1]) else { return nil }; self = .zramSwap(device: n)
            default: return nil
            }
        }

        /// Undoes the change; a description of what was restored.
        func undo() -> String {
            switch self {
            case .knob(let p, let old):
                let err = writeFile(p, old)
                return "\(p) = \(old)" + (err.map { " (failed: \(Errno.name($0)))" } ?? "")
            case .zramSwap(let n):
                // Another live run that uses the device (it journaled it too)
                // keeps it: the last user removes it.
                if let other = SystemState.otherLiveUsers(ofZram: n).first {
                    return "left /dev/zram\(n) to pid \(other), which still swaps to it"
                }
                let off = cp_swapoff("/dev/zram\(n)")
                let removed = writeFile("/sys/class/zram-control/hot_remove", String(n))
                return "swapoff and removed /dev/zram\(n)" + (off < 0 && off != -EINVAL ? " (swapoff: \(Errno.name(-off)))" : "")
                    + (removed.map { " (hot_remove: \(Errno.name($0)))" } ?? "")
            }
        }
    }

    private let state = Locked<[Change]>([])
    private var lockFD: FileDescriptor?
    private var exitHook = false

    /// Sets a sysfs/procfs value, journaling the old one first; undone when
    /// the case ends. Holds the cross-process lock until then.
    ///
    /// Read, journal and write happen under the cross-process lock (another
    /// run's change in place is never taken for the old value) and under
    /// `state` (an interrupt's `restore` never runs between the journal and
    /// the write, which would leave the change unjournaled).
    public func set(_ path: String, _ value: String) throws {
        try state.with { changes in
            try checkOpen(path)
            // Beside other cases, the supervisor set what they all need (and holds the lock).
            if !sideBySide { try takeLock() }
            guard let old = readFile(path)?.trimmed else { throw CaseSkip("cannot read \(path)") }
            let stored = Self.storedValue(path, old)
            if stored == value { return }
            if sideBySide {
                throw HarnessError("the case would set \(path) to '\(value)' while other cases run beside it: its SharedNeeds must name that knob, or `alone`")
            }
            // The journal keeps the value from before the case's first change
            // of this knob: a second change (ksmd started, then stopped) adds
            // nothing to undo, and the restore writes each knob once.
            if !changes.contains(where: { $0.isKnob(path) }) {
                changes.append(.knob(path: path, old: stored))
                try writeJournal(changes)
            }
            if let err = writeFile(path, value) {
                throw CaseSkip("cannot write '\(value)' to \(path): \(Errno.name(err))\(err == EACCES || err == EPERM ? " (needs root)" : "")")
            }
        }
    }

    /// Sets each knob, in order; see `set(_:_:)`.
    public func set(_ knobs: [SharedNeeds.Knob]) throws {
        for k in knobs { try set(k.path, k.value) }
    }

    /// Whether the case runs beside others (`cowpin run --jobs`): its
    /// supervisor set the knobs it needs and holds the cross-process lock.
    /// It may then change nothing: `set` of another value and `lockForCase`
    /// are harness errors (its `SharedNeeds` are wrong).
    public var besideOthers: Bool {
        get { state.with { _ in sideBySide } }
        set { state.with { _ in sideBySide = newValue } }
    }
    private var sideBySide = false

    /// After an interrupt's cleanup nothing changes any more (the process is
    /// about to exit; a case still running must not undo that cleanup).
    private var closed = false

    private func checkOpen(_ what: String) throws {
        if closed { throw CaseSkip("cowpin is exiting (interrupted): \(what) is left as it is") }
    }

    /// Whether a change is undone when its case ends (knobs), or when the run
    /// ends (a swap device: set up once, shared by the cases that need it).
    static func caseScoped(_ c: Change) -> Bool {
        if case .knob = c { return true }
        return false
    }

    private func journal(_ c: Change, lock: Bool) throws {
        try state.with { changes in
            try checkOpen(c.line)
            if lock { try takeLock() }
            changes.append(c)
            try writeJournal(changes)
        }
    }

    /// One process changes (or depends on) global knobs at a time: a second
    /// one waits, bounded. Held until the case ends. Call with `state` held.
    /// Whoever takes it first restores what processes that died left in
    /// their journals: a change a dead process made outlives its lock, and
    /// must not be taken for the value to restore.
    @discardableResult
    private func takeLock() throws -> [String] {
        guard lockFD == nil else { return [] }
        lockFD = Self.openLock()
        var waitedUs = 0, pause = 1_000
        while let fd = lockFD, flock(fd.rawValue, LOCK_EX | LOCK_NB) != 0 {
            if waitedUs >= 30_000_000 { throw CaseSkip("another cowpin run holds \(Self.lockPath) (it is changing system state)") }
            usleep(UInt32(pause))
            waitedUs += pause
            pause = min(2 * pause, 50_000)
        }
        return Self.restoreJournalsOfTheDead()
    }

    /// Call with `state` held.
    private func releaseLock() {
        try? lockFD?.close()
        lockFD = nil
    }

    /// Holds the cross-process lock for the rest of the case, for a case that
    /// depends on global state without changing it (free huge pages).
    public func lockForCase() throws {
        try state.with { _ in
            if sideBySide { throw HarnessError("the case depends on state other cases change (it takes cowpin's lock) while they run beside it: its SharedNeeds must say `alone`") }
            try takeLock()
        }
    }

    private var journalPath: String { Self.directory + "/journal-\(getpid())" }

    /// Rewrites the journal with `changes` (removes it when empty). Not
    /// fsynced: it must outlive the process (a SIGKILL), not the machine
    /// (after a reboot the knobs are back at their boot values anyway).
    /// Overwritten in place and cut to length, never truncated to zero first:
    /// on ext4 a file truncated to zero and rewritten is flushed when it is
    /// closed (auto_da_alloc), 0.4 ms per case when /run is not a tmpfs.
    private func writeJournal(_ changes: [Change]) throws {
        if changes.isEmpty {
            unlink(journalPath)
            return
        }
        mkdir(Self.directory, 0o700)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(journalPath), .writeOnly, options: [.create, .closeOnExec], permissions: .ownerReadWrite)
        } catch {
            throw SyscallError("open(\(journalPath))", error)
        }
        defer { try? fd.close() }
        let text = Array(changes.map { $0.line + "\n" }.joined().utf8)
        let n: Int
        do {
            n = try text.withUnsafeBytes { try fd.write(toAbsoluteOffset: 0, $0) }
        } catch {
            throw SyscallError("write(\(journalPath))", error)
        }
        guard n == text.count else { throw SyscallError("write(\(journalPath))", errno: EIO) }
        do {
            try fd.resize(to: Int64(text.count))
        } catch {
            throw SyscallError("ftruncate(\(journalPath))", error)
        }
    }

    /// Undoes the changes of the case that ends (`caseOnly`), or all of them
    /// (the run ends), newest first, and returns what was restored.
    @discardableResult
    public func restore(caseOnly: Bool = false) -> [String] {
        state.with { changes in
            var done: [String] = []
            for c in changes.reversed() where !caseOnly || Self.caseScoped(c) { done.append(c.undo()) }
            changes.removeAll { !caseOnly || Self.caseScoped($0) }
            // Rewritten only when it changed (a run-scoped swap entry stays put).
            if !done.isEmpty || !caseOnly { try? writeJournal(changes) }
            releaseLock()
            return done
        }
    }

    /// Restores everything for an interrupted process, and refuses changes from then on.
    public func restoreAndClose() -> [String] {
        state.with { _ in closed = true }
        return restore()
    }

    /// Restores everything when the process exits normally (test runners too).
    public static func restoreAtExit() {
        atexit { SystemState.shared.restore() }
    }

    private func registerExitHook() {
        let first = state.with { _ -> Bool in
            defer { exitHook = true }
            return !exitHook
        }
        if first { Self.restoreAtExit() }
    }

    /// Makes sure a swap device is active: an existing one, or a zram device
    /// created, formatted and enabled here. It stays for the rest of the run
    /// (journaled: removed at the end, on SIGINT/SIGTERM, or by the next run).
    public func ensureSwap() throws {
        // Under the lock, so that two runs never both create a device; beside
        // other cases the supervisor holds it (and set the swap up already).
        if besideOthers { return try ensureSwapLocked() }
        try withLock { try ensureSwapLocked() }
    }

    private func ensureSwapLocked() throws {
        let active = ProbeParsing.swaps(readFile("/proc/swaps") ?? "")
        if !active.isEmpty {
            // A zram device another cowpin run created: use it as one of its
            // users (journaled like our own), so that the run which created it
            // does not remove it while this one depends on it.
            for name in active.map(\.name) {
                guard name.hasPrefix("/dev/zram"), let n = Int(name.dropFirst("/dev/zram".count)),
                      !Self.otherLiveUsers(ofZram: n).isEmpty else { continue }
                let mine = state.with { changes in changes.contains { if case .zramSwap(n) = $0 { return true } else { return false } } }
                if !mine {
                    registerExitHook()
                    try journal(.zramSwap(device: n), lock: false)
                }
            }
            return
        }
        guard access("/sys/class/zram-control/hot_add", F_OK) == 0 else {
            throw CaseSkip("no swap device, and no zram to create one (CONFIG_ZRAM, module zram)")
        }
        guard let n = readFile("/sys/class/zram-control/hot_add").flatMap({ Int($0.trimmed) }) else {
            throw CaseSkip("cannot create a zram device (reading /sys/class/zram-control/hot_add needs root)")
        }
        registerExitHook()
        do { try journal(.zramSwap(device: n), lock: false) } catch {
            _ = writeFile("/sys/class/zram-control/hot_remove", String(n))
            throw error
        }
        let size: UInt64 = 256 << 20
        if let err = writeFile("/sys/block/zram\(n)/disksize", String(size)) {
            throw SyscallError("write /sys/block/zram\(n)/disksize", errno: err)
        }
        try check("mkswap /dev/zram\(n)", cp_write_swap_header("/dev/zram\(n)", size, Int(cp_page_size())))
        try check("swapon /dev/zram\(n)", cp_swapon("/dev/zram\(n)"))
    }

    /// How to write back what a knob showed: "always [madvise] never" -> "madvise".
    static func storedValue(_ path: String, _ shown: String) -> String {
        ProbeParsing.bracketed(shown) ?? shown
    }

    /// Restores what runs that died (SIGKILL) left in their journals, under
    /// the cross-process lock (taken for it, bounded, unless held already).
    @discardableResult
    public static func recoverStale() -> [String] {
        shared.state.with { _ in
            if shared.lockFD != nil { return restoreJournalsOfTheDead() }
            // Whoever holds the lock meanwhile restores them when it takes it.
            guard let restored = try? shared.takeLock() else { return [] }
            shared.releaseLock()
            return restored
        }
    }

    /// Runs `body` under the cross-process lock (taken for it, bounded, and
    /// released after, unless this process held it already): no cowpin run
    /// changes system state meanwhile, and what dead ones left is restored.
    public func withLock<T>(_ body: () throws -> T) throws -> T {
        let took = try state.with { _ -> Bool in
            if lockFD != nil { return false }
            try takeLock()
            return true
        }
        defer {
            if took {
                state.with { _ in releaseLock() }
            }
        }
        return try body()
    }

    /// Call with the cross-process lock held.
    /// Live cowpin processes other than this one whose journal names zram device `n`.
    static func otherLiveUsers(ofZram n: Int) -> [Int32] {
        listDirectory(directory).compactMap { name -> Int32? in
            guard name.hasPrefix("journal-"), let pid = Int32(name.dropFirst("journal-".count)), pid != getpid(), processAlive(pid),
                  let text = readFile(directory + "/" + name) else { return nil }
            let uses = text.split(separator: "\n").compactMap(Change.init(line:)).contains {
                if case .zramSwap(n) = $0 { return true } else { return false }
            }
            return uses ? pid : nil
        }
    }

    private static func restoreJournalsOfTheDead() -> [String] {
        var restored: [String] = []
        for name in listDirectory(directory) where name.hasPrefix("journal-") {
            guard let pid = Int32(name.dropFirst("journal-".count)), pid != getpid(), !processAlive(pid) else { continue }
            let path = directory + "/" + name
            let changes = (readFile(path) ?? "").split(separator: "\n").compactMap(Change.init(line:))
            for c in changes.reversed() { restored.append("\(c.undo()) (left by pid \(pid))") }
            unlink(path)
        }
        return restored
    }
}
