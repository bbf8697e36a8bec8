import Glibc

/// The names of the signals cowpin reports (a worker's or a child's death, an interrupt).
private let signalNames: [Int32: String] = [
    SIGHUP: "SIGHUP", SIGINT: "SIGINT", SIGQUIT: "SIGQUIT", SIGILL: "SIGILL", SIGTRAP: "SIGTRAP", SIGABRT: "SIGABRT",
    SIGBUS: "SIGBUS", SIGFPE: "SIGFPE", SIGKILL: "SIGKILL", SIGSEGV: "SIGSEGV", SIGPIPE: "SIGPIPE", SIGALRM: "SIGALRM",
    SIGTERM: "SIGTERM", SIGXCPU: "SIGXCPU", SIGXFSZ: "SIGXFSZ",
]

/// "SIGBUS"; "signal 40" for one without a name here.
public func signalName(_ sig: Int32) -> String {
    signalNames[sig] ?? "signal \(sig)"
}

/// "SIGBUS (signal 7)".
public func signalDescription(_ sig: Int32) -> String {
    "\(signalName(sig)) (signal \(sig))"
}
