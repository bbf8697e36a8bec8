import CowPin
import Foundation
import Testing

/// The exit statuses `git bisect run` reads from scripts/vm-run and
/// scripts/kernel-build: 0 good, 1 bad, 125 skip this commit, 128 or more
/// abort the bisect (usage and setup errors no commit can fix). The cheap
/// ones are checked here without booting a kernel: QEMU refuses an image
/// that is not a kernel before any guest code runs. scripts/vm-check boots
/// Debian's 6.1 for 0 (a coherent case) and 1 (a decoherent one).
@Suite(.serialized)
struct BisectExitTests {
    static let project = FileManager.default.currentDirectoryPath

    static func script(_ name: String, _ args: [String]) throws -> CLITests.Output {
        try CLITests.run(args, via: ["/bin/bash", project + "/scripts/" + name], binary: false)
    }

    static func tempDir() throws -> String {
        var template = Array((NSTemporaryDirectory() + "cowpin-bisect-XXXXXX").utf8CString)
        guard let p = mkdtemp(&template) else { throw CaseSkip("mkdtemp failed") }
        return String(cString: p)
    }

    @Test("vm-run: bad arguments and missing files exit 128, before anything boots", arguments: [
        (["--kernal", "bzImage"], "unknown option '--kernal'"),
        (["--kernel", "/nonexistent/bzImage"], "no file '/nonexistent/bzImage'"),
        (["--kernel", "/etc/hostname"], "not a bootable x86 kernel image"),
        (["--deb", "nosuchsuite"], "neither a Debian suite"),
        (["--deb", "bookworm", "--format", "xml"], "--format must be"),
        ([], "give --kernel PATH or --deb NAME"),
    ])
    func vmRunUsage(_ args: [String], _ message: String) throws {
        let o = try Self.script("vm-run", args)
        #expect(o.status == 128, "vm-run \(args.joined(separator: " ")) exited \(o.status): \(o.stderr)")
        #expect(o.stderr.contains(message), "\(o.stderr)")
        #expect(!o.stderr.contains("accelerator"), "nothing may boot: \(o.stderr)")
    }

    @Test("kernel-build: bad arguments and a missing source exit 128", arguments: [
        ([], "give the kernel source"),
        (["--jobs", "0", "/tmp"], "--jobs needs a positive count"),
        (["--frobnicate", "/tmp"], "unknown option '--frobnicate'"),
        (["/nonexistent/linux"], "no directory or file '/nonexistent/linux'"),
        (["/etc"], "is not a kernel source tree"),
        (["a", "b", "c"], "too many arguments"),
    ])
    func kernelBuildUsage(_ args: [String], _ message: String) throws {
        let o = try Self.script("kernel-build", args)
        #expect(o.status == 128, "kernel-build \(args.joined(separator: " ")) exited \(o.status): \(o.stderr)")
        #expect(o.stderr.contains(message), "\(o.stderr)")
    }

    /// A tree that does not configure is a commit to skip (125), not a bad one.
    @Test("kernel-build: a tree whose configuration fails exits 125")
    func kernelBuildFailure() throws {
        guard getuid() == 0 else { throw CaseSkip("kernel-build installs its tools as root") }
        let dir = try Self.tempDir()
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let tree = dir + "/linux", out = dir + "/obj"
        try FileManager.default.createDirectory(atPath: tree + "/scripts/kconfig", withIntermediateDirectories: true)
        try "x86_64_defconfig:\n\t@echo 'this tree does not configure' >&2; exit 2\n".write(toFile: tree + "/Makefile", atomically: true, encoding: .utf8)
        try "".write(toFile: tree + "/Kconfig", atomically: true, encoding: .utf8)
        try "exit 1\n".write(toFile: tree + "/scripts/kconfig/merge_config.sh", atomically: true, encoding: .utf8)
        let o = try Self.script("kernel-build", [tree, out])
        #expect(o.status == 125, "kernel-build exited \(o.status): \(o.stderr)")
        #expect(o.stderr.contains("make x86_64_defconfig failed"), "\(o.stderr)")
    }

    /// An image QEMU cannot start: the kernel could not be tested (125). With
    /// a .config beside it (a build tree's arch/x86/boot/bzImage), the
    /// options the VM needs and that .config lacks are named.
    @Test("vm-run: a kernel that never reaches the test exits 125 and names the options its .config lacks")
    func vmRunUntestable() throws {
        guard getuid() == 0 else { throw CaseSkip("vm-run installs QEMU as root") }
        let dir = try Self.tempDir()
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/arch/x86/boot", withIntermediateDirectories: true)
        // The x86 boot header's magic at 514, and nothing QEMU can load behind it.
        var image = [UInt8](repeating: 0, count: 65536)
        image.replaceSubrange(514..<518, with: Array("HdrS".utf8))
        try Data(image).write(to: URL(fileURLWithPath: dir + "/arch/x86/boot/bzImage"))
        try """
            CONFIG_PCI=y
            CONFIG_VIRTIO_PCI=y
            CONFIG_NET_9P=y
            # CONFIG_NET_9P_VIRTIO is not set
            # CONFIG_9P_FS is not set
            CONFIG_DEVTMPFS=y
            CONFIG_TMPFS=y
            CONFIG_BLK_DEV_INITRD=y
            CONFIG_SERIAL_8250=y
            CONFIG_SERIAL_8250_CONSOLE=y
            CONFIG_PROC_FS=y
            CONFIG_SYSFS=y

            """.write(toFile: dir + "/.config", atomically: true, encoding: .utf8)
        let o = try Self.script("vm-run", ["--kernel", dir + "/arch/x86/boot/bzImage", "--exec", "true", "--timeout", "60"])
        #expect(o.status == 125, "vm-run exited \(o.status): \(o.stderr)")
        #expect(o.stderr.contains("the guest never reached the test"), "\(o.stderr)")
        #expect(o.stderr.contains("the kernel lacks CONFIG_NET_9P_VIRTIO CONFIG_9P_FS"), "\(o.stderr)")
    }

    @Test("cowpin run --dry-run prints the selected ids (vm-run boots what they need) and runs nothing")
    func dryRunIds() throws {
        let o = try CLITests.cowpin("run", "--dry-run", "--filter", "cow/fork-child-writes/anon-page", "--filter", "vfio-ro/pin-ro-exclusive/thp-pmd")
        #expect(o.status == 0, "\(o.stderr)")
        #expect(o.stdout == "cow/fork-child-writes/anon-page\nvfio-ro/pin-ro-exclusive/thp-pmd\n")
        #expect(o.stderr.contains("would run 2 case run(s)"))
    }
}
