import Glibc

/// Mounts left behind: the connection of a server that is going, and the
/// mounts and directories of cowpin processes that died (the mountpoint
/// names its owner's pid).
extension FuseServer {
    /// Fails every request in flight: through fusectl when it is mounted.
    /// (Closing the last /dev/fuse descriptor, in `shutdown`, does the same.)
    /// Never stat()s the mount: with the server gone that would wait forever.
    func abortConnection() {
        guard let minor = Self.connectionMinor(mountpoint, mountinfo: readFile("/proc/self/mountinfo") ?? "") else { return }
        writeFile("/sys/fs/fuse/connections/\(minor)/abort", "1")
    }

    /// The FUSE connection number (the mount's device minor) from mountinfo.
    static func connectionMinor(_ mountpoint: String, mountinfo: String) -> Int? {
        for line in mountinfo.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 4, f[4] == mountpoint else { continue }
            return f[2].split(separator: ":").last.flatMap { Int($0) }
        }
        return nil
    }

    /// Removes mounts and directories left by cowpin processes that died,
    /// or are dying. A process SIGKILLed while one of its threads waited
    /// for the answer to a request its own server had already read cannot
    /// finish exiting: the kernel waits for that answer without regard to
    /// signals, and the server is gone. MNT_FORCE aborts the connection,
    /// which ends the wait (even when the unmount itself is refused).
    public static func removeStale() {
        let mountinfo = readFile("/proc/self/mountinfo") ?? ""
        for line in mountinfo.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 4 else { continue }
            let point = String(f[4])
            if let pid = ownerPID(point), ownerGone(pid) {
                umount2(point, Int32(MNT_FORCE))
                umount2(point, Int32(MNT_DETACH))
                rmdir(point)
            }
        }
        for name in listDirectory("/tmp") {
            let path = "/tmp/" + name
            if let pid = ownerPID(path), ownerGone(pid) { rmdir(path) }
        }
    }

    /// Whether `pid` has exited, or is exiting: its main thread is a zombie,
    /// it is in do_exit() (PF_EXITING), or a SIGKILL is pending for it. The
    /// last covers a process blocked at the very start of do_exit(), before
    /// PF_EXITING: io_uring_files_cancel() waits in io_wq_put_and_exit() for
    /// an io_uring worker that waits for the answer of the FUSE server that
    /// died with the process (see `removeStale`).
    public static func ownerGone(_ pid: Int32) -> Bool {
        guard processAlive(pid) else { return true }
        guard let stat = readFile("/proc/\(pid)/stat"), let paren = stat.lastIndex(of: ")") else { return false }
        // After the name: state ppid pgrp session tty_nr tpgid flags ...
        let fields = stat[paren...].dropFirst().split(separator: " ")
        guard let state = fields.first else { return false }
        if state == "Z" || state == "X" { return true }
        let pfExiting: UInt64 = 0x4
        if fields.count > 6, let flags = UInt64(fields[6]), flags & pfExiting != 0 { return true }
        return sigkillPending(pid)
    }

    /// Whether a SIGKILL is pending for the process (ShdPnd or SigPnd of /proc/PID/status).
    static func sigkillPending(_ pid: Int32) -> Bool {
        guard let status = readFile("/proc/\(pid)/status") else { return false }
        let bit = UInt64(1) << UInt64(SIGKILL - 1)
        for line in status.split(separator: "\n") where line.hasPrefix("ShdPnd:") || line.hasPrefix("SigPnd:") {
            if let mask = UInt64(line.split(separator: "\t").last ?? "", radix: 16), mask & bit != 0 { return true }
        }
        return false
    }

    static func ownerPID(_ path: String) -> Int32? {
        guard path.hasPrefix("/tmp/" + mountPrefix) else { return nil }
        let rest = path.dropFirst(("/tmp/" + mountPrefix).count)
        return rest.split(separator: "-").first.flatMap { Int32($0) }
    }
}
