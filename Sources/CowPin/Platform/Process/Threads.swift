import Glibc

/// A value behind a pthread mutex.
final class Locked<Value>: @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    init(_ value: Value) {
        self.value = value
        m = .allocate(capacity: 1)
        pthread_mutex_init(m, nil)
    }

    deinit {
        pthread_mutex_destroy(m)
        m.deallocate()
    }

    func with<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body(&value)
    }
}

/// Runs `body` on a new detached thread (pthread; no Foundation). A thread
/// that cannot be created (EAGAIN under a pids cgroup or RLIMIT_NPROC) is a
/// `SyscallError`, never a trap.
func startThread(_ body: @escaping () -> Void) throws {
    final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var t = pthread_t()
    let r = pthread_create(&t, nil, { arg in
        let b = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
        b.body()
        return nil
    }, box)
    guard r == 0 else {
        Unmanaged<AnyObject>.fromOpaque(box).release()
        throw SyscallError("pthread_create", errno: r)
    }
    pthread_detach(t)
}

/// Whether a process exists (for the owners of journals and mounts).
func processAlive(_ pid: Int32) -> Bool { kill(pid, 0) == 0 || errno != ESRCH }
