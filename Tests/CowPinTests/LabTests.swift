import CowPin
import Foundation
import Testing

/// What a copied cowpin needs outside a checkout (a lab rootfs, a guest's
/// initramfs), and the LAVA job that runs it there.
struct LabTests {
    @Test("the history compiled into cowpin is data/expected-verdicts.json, byte for byte, and loads")
    func embeddedHistory() throws {
        let file = try Data(contentsOf: URL(fileURLWithPath: FileManager.default.currentDirectoryPath + "/data/expected-verdicts.json"))
        #expect(ExpectedVerdicts.embeddedBytes == [UInt8](file))
        let h = try ExpectedVerdicts.embedded()
        #expect(h.problems.isEmpty)
        #expect(h.families.count == (try ExpectedVerdicts.load(path: "data/expected-verdicts.json")).families.count)
    }

    @Test("cowpin explain finds its history outside the checkout; --expected still overrides it")
    func historyOutsideCheckout() throws {
        let id = "iouring-fixed/mprotect-cycle-write/anon-page"
        let out = try CLITests.run(["explain", id, "--release", "5.15.0"], via: ["/bin/sh", "-c", "cd / && exec \"$0\" \"$@\""])
        #expect(out.status == 0, "\(out.stderr)")
        #expect(out.stdout.contains("expected on 5.15.0: decoherent"), "\(out.stdout)")
        #expect(!out.stdout.contains("unavailable"), "\(out.stdout)")
        let missing = try CLITests.run(["explain", id, "--expected", "/nonexistent/history.json"])
        #expect(missing.stdout.contains("upstream history: unavailable (cannot read /nonexistent/history.json)"), "\(missing.stdout)")
    }
}
