import CowPin
import Foundation
import Testing

struct RenderingTests {
    static let evidence = Evidence(
        findings: [Finding(view: "pin (test)", expected: "the parent's write (0xff)", meaning: "stale",
                           differingBytes: 10, differingPages: 1, totalRanges: 1,
                           ranges: [DiffRange(offset: 16, length: 10, firstPage: 0, lastPage: 0,
                                              expectedBytes: "ff ff", seenBytes: "cc cc", seenIs: "the child's write (0xcc)")])],
        pages: [PageSnapshot(step: "after the write", who: "parent", page: 0, pfn: 0x1234, flags: ["anon", "exclusive"])],
        notes: ["a note"])

    @Test func resultLines() {
        #expect(KTAPReporter.resultLine(.coherent, number: 1, name: "a/b/c") == "ok 1 a/b/c")
        #expect(KTAPReporter.resultLine(.decoherent(Self.evidence), number: 2, name: "a") == "not ok 2 a")
        #expect(KTAPReporter.resultLine(.skip(reason: "no THP"), number: 3, name: "a") == "ok 3 a # SKIP no THP")
        #expect(KTAPReporter.resultLine(.xfail(reason: "unfixed", reference: "ref", evidence: Self.evidence), number: 4, name: "a")
                == "ok 4 a # XFAIL unfixed [ref]")
        #expect(KTAPReporter.resultLine(.xpass(reason: "unfixed", reference: "ref"), number: 5, name: "a") == "ok 5 a # XPASS unfixed [ref]")
        #expect(KTAPReporter.resultLine(.error("child\nkilled # x"), number: 6, name: "a") == "not ok 6 a # ERROR child killed   x")
    }

    @Test func streamShape() {
        var lines: [String] = []
        let k = KTAPReporter(timing: true) { lines.append($0) }
        k.begin(planned: 2, probe: .current())
        k.finished(CaseResult(id: "x/1", verdict: .coherent, durationNs: 1_500_000), number: 1)
        k.finished(CaseResult(id: "x/2", verdict: .decoherent(Self.evidence), durationNs: 2_000), number: 2)
        var t = Totals()
        t.add(.coherent)
        t.add(.decoherent)
        k.end(t)
        #expect(lines[0] == "TAP version 13")
        #expect(lines[1] == "1..2")
        #expect(lines.contains("# time: 1.500 ms"))
        #expect(lines.contains("# pin (test): expected the parent's write (0xff); 10 byte(s) differ in 1 page(s), 1 range(s)"))
        #expect(lines.contains("#   [0x10, +0xa) page 0: seen the child's write (0xcc)"))
        #expect(lines.contains("# page 0 of parent after the write: pfn 0x1234 [anon,exclusive]"))
        // Evidence comes before its result line.
        let evidenceAt = lines.firstIndex { $0.hasPrefix("# pin (test)") }!
        #expect(evidenceAt < lines.firstIndex(of: "not ok 2 x/2")!)
        #expect(lines.last == "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0")
    }

    @Test func jsonRoundTrip() throws {
        var out = ""
        let j = JSONReporter { out += $0 }
        j.begin(planned: 2, probe: .current())
        j.finished(CaseResult(id: "x/1", verdict: .skip(reason: "why"), durationNs: 3_000_000), number: 1)
        j.finished(CaseResult(id: "x/2", verdict: .decoherent(Self.evidence)), number: 2)
        var t = Totals()
        t.add(.skip)
        t.add(.decoherent)
        j.end(t)
        let doc = try JSONDecoder().decode(JSONReporter.Document.self, from: Data(out.utf8))
        #expect(doc.results.count == 2)
        #expect(doc.results[0].verdict == .skip && doc.results[0].reason == "why" && doc.results[0].durationMs == 3)
        #expect(doc.results[1].evidence == Self.evidence)
        #expect(doc.totals == t && doc.exitCode == 1)
    }

    @Test func exitCodes() {
        var t = Totals()
        #expect(t.exitCode == 0)
        t.add(.skip)
        #expect(t.exitCode == 4)
        t.add(.coherent)
        #expect(t.exitCode == 0)
        t.add(.xfail)
        #expect(t.exitCode == 0)
        t.add(.error)
        #expect(t.exitCode == 2)
        t.add(.decoherent)
        #expect(t.exitCode == 1)
    }
}

struct SelectionTests {
    @Test func globs() throws {
        let all = Catalog.all
        let io = try Selection(filters: ["iouring-fixed/*"]).select(from: all)
        #expect(!io.isEmpty && io.allSatisfy { $0.id.hasPrefix("iouring-fixed/") })
        // `*` crosses `/`, as users type it.
        let pmd = try Selection(filters: ["*thp-pmd"]).select(from: all)
        #expect(!pmd.isEmpty && pmd.allSatisfy { $0.id.hasSuffix("/thp-pmd") })
        let both = try Selection(filters: ["cow/*", "vmsplice/*"]).select(from: all)
        let slow = { (c: Case) in c.tags.contains(Selection.slowTag) }
        #expect(both.count == all.filter { ($0.id.hasPrefix("cow/") || $0.id.hasPrefix("vmsplice/")) && !slow($0) }.count)
    }

    @Test("slow cases run only when asked for")
    func slowOnlyWhenAsked() throws {
        let all = Catalog.all
        let slow = all.filter { $0.tags.contains(Selection.slowTag) }
        #expect(!slow.isEmpty && slow.allSatisfy { $0.id.contains("1048576k") })
        #expect(try Selection().select(from: all).count == all.count - slow.count)
        #expect(try Selection(includeSlow: true).select(from: all).count == all.count)
        #expect(try Selection(tags: [Selection.slowTag]).select(from: all).count == slow.count)
        #expect(try Selection(filters: ["cow/*"]).select(from: all).allSatisfy { !$0.tags.contains(Selection.slowTag) })
    }

    @Test func tagsAndExcludes() throws {
        let forkTHP = try Selection(tags: ["fork", "thp"]).select()
        #expect(!forkTHP.isEmpty && forkTHP.allSatisfy { $0.tags.contains("fork") && $0.tags.contains("thp") })
        let noPTE = try Selection(filters: ["cow/*"], excludes: ["*/thp-pte"]).select()
        #expect(!noPTE.isEmpty && !noPTE.contains { $0.id.hasSuffix("thp-pte") })
    }

    @Test func unmatchedIsAnError() {
        #expect(throws: Selection.Unmatched.self) { try Selection(filters: ["nosuch*"]).select() }
        #expect(throws: Selection.Unmatched.self) { try Selection(tags: ["nosuchtag"]).select() }
    }

    @Test func idsAreUniqueAndStable() {
        let ids = Catalog.all.map(\.id)
        #expect(Set(ids).count == ids.count)
        #expect(ids.contains("iouring-fixed/fork-parent-writes/thp-pmd"))
        #expect(ids.allSatisfy { $0.split(separator: "/").count == 3 })
    }
}

struct ProbeParsingTests {
    @Test func bracketed() {
        #expect(ProbeParsing.bracketed("always [madvise] never") == "madvise")
        #expect(ProbeParsing.bracketed("[always] inherit madvise never\n") == "always")
        #expect(ProbeParsing.bracketed("never") == nil)
    }

    @Test func hugepageDirs() {
        #expect(ProbeParsing.hugepagesDirSizeKB("hugepages-2048kB") == 2048)
        #expect(ProbeParsing.hugepagesDirSizeKB("hugepages-1048576kB") == 1_048_576)
        #expect(ProbeParsing.hugepagesDirSizeKB("enabled") == nil)
    }

    @Test func capabilities() {
        let status = "Name:\tcowpin\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n"
        #expect(ProbeParsing.capEff(status) == 0x1fffeffffff)
        #expect(ProbeParsing.capEff("Name: x\n") == nil)
    }

    @Test func swaps() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/zram0                              partition\t1048572\t\t0\t\t100\n"
        let s = ProbeParsing.swaps(text)
        #expect(s == [Probe.SwapDevice(name: "/dev/zram0", type: "partition", sizeKB: 1_048_572, usedKB: 0, priority: 100)])
        #expect(ProbeParsing.swaps("Filename\tType\tSize\tUsed\tPriority\n").isEmpty)
    }

    @Test func filesystemsAndMounts() {
        #expect(ProbeParsing.filesystems("nodev\tsysfs\nnodev\tfuse\n\text4\n").isSuperset(of: ["fuse", "ext4", "sysfs"]))
        let mounts = "sysfs /sys sysfs rw 0 0\ndebugfs /sys/kernel/debug debugfs rw 0 0\n"
        #expect(ProbeParsing.isMounted(mounts, type: "debugfs", at: "/sys/kernel/debug"))
        #expect(!ProbeParsing.isMounted(mounts, type: "tracefs", at: "/sys/kernel/tracing"))
    }

    @Test func kernelConfig() {
        let v = KernelConfig.parse("# CONFIG_GUP_TEST is not set\nCONFIG_IO_URING=y\nCONFIG_ZRAM_DEF_COMP=\"lzo-rle\"\n")
        #expect(v == ["CONFIG_IO_URING": "y", "CONFIG_ZRAM_DEF_COMP": "\"lzo-rle\""])
        // Only the keys asked for; a key is not a prefix of a longer one.
        let text = "CONFIG_GUP_TEST=y\nCONFIG_GUP_TEST_X=y\nCONFIG_IO_URING=y\n"
        #expect(KernelConfig.parse(text, keys: ["CONFIG_GUP_TEST"]) == ["CONFIG_GUP_TEST": "y"])
        #expect(KernelConfig.parse("CONFIG_GUP_TEST_X=y\n", keys: ["CONFIG_GUP_TEST"]).isEmpty)
    }

    @Test func smaps() {
        let text = """
        7f0000000000-7f0000200000 rw-p 00000000 00:00 0
        Size:               2048 kB
        AnonHugePages:      2048 kB
        7f0000200000-7f0000201000 rw-p 00000000 00:00 0
        Size:                  4 kB
        AnonHugePages:         0 kB
        """
        let bytes = Array(text.utf8)
        #expect(PageInfo.smapsValue("AnonHugePages", in: bytes, containing: 0x7f0000100000) == 2048)
        #expect(PageInfo.smapsValue("AnonHugePages", in: bytes, containing: 0x7f0000200000) == 0)
        #expect(PageInfo.smapsValue("Size", in: bytes, containing: 0x7f0000200fff) == 4)
        #expect(PageInfo.smapsValue("AnonHugePages", in: bytes, containing: 0x1000) == nil)
    }

    @Test func probeOfThisKernel() {
        let p = Probe.current()
        #expect(!p.kernel.release.isEmpty)
        #expect(p.pageSize > 0)
        if p.thp.available { #expect(p.thp.pmdSize != nil) }
    }
}

struct ComparisonTests {
    @Test func equalIsNil() {
        let c = Content.original(seed: 7)
        var buf = [UInt8](repeating: 0, count: 8192)
        buf.withUnsafeMutableBytes { c.materialize(into: $0) }
        let f = buf.withUnsafeBytes { Comparison.compare(view: "v", seen: $0, expected: c, candidates: [c], meaning: "", pageSize: 4096) }
        #expect(f == nil)
    }

    @Test func rangesPagesAndWhose() throws {
        let original = Content.original(seed: 7)
        let child = Content.written(0xCC, by: "the child")
        var buf = [UInt8](repeating: 0, count: 3 * 4096)
        buf.withUnsafeMutableBytes { original.materialize(into: $0) }
        // The child's bytes in page 1, zeroes in page 2.
        for i in 4096 + 100..<4096 + 300 { buf[i] = 0xCC }
        for i in 8192 + 8..<8192 + 40 { buf[i] = 0 }
        let f = try #require(buf.withUnsafeBytes {
            Comparison.compare(view: "child mapping", seen: $0, expected: original,
                               candidates: [original, child, .zero], meaning: "m", pageSize: 4096)
        })
        #expect(f.differingPages == 2)
        #expect(f.totalRanges == 2)
        #expect(f.ranges[0].firstPage == 1 && f.ranges[0].seenIs == "the child's write (0xcc)")
        #expect(f.ranges[0].seenBytes.hasPrefix("cc cc"))
        #expect(f.ranges[1].firstPage == 2 && f.ranges[1].seenIs == "zeroes")
        // Bytes of the pattern that happen to equal 0xcc or 0 do not count as different.
        let same = (4096 + 100..<4096 + 300).filter { original.byte(at: $0) == 0xCC }.count
            + (8192 + 8..<8192 + 40).filter { original.byte(at: $0) == 0 }.count
        #expect(f.differingBytes == 200 + 32 - same)
    }

    @Test("the pattern fill and check agree with the byte formula at any offset and length, and see one flipped byte")
    func patternAtAnyOffset() {
        let c = Content.original(seed: 99)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let offset = Int.random(in: 0..<(1 << 20), using: &rng), count = Int.random(in: 0..<9000, using: &rng)
            var buf = [UInt8](repeating: 0, count: count)
            buf.withUnsafeMutableBytes { c.materialize(into: $0, offset: offset) }
            #expect(buf.indices.allSatisfy { buf[$0] == c.byte(at: offset + $0) }, "offset \(offset) count \(count)")
            #expect(buf.withUnsafeBytes { c.matches($0, offset: offset) })
            guard count > 0 else { continue }
            buf[Int.random(in: 0..<count, using: &rng)] ^= 0x10
            #expect(!buf.withUnsafeBytes { c.matches($0, offset: offset) }, "offset \(offset) count \(count)")
        }
    }

    @Test("a layout with overlays matches exactly the bytes it describes")
    func layoutMatches() {
        let original = Content.original(seed: 5), data = Content.pattern(seed: 6, label: "the server's data")
        let write = Content.written(0xFF, by: "the parent")
        // Later overlays win where they overlap.
        let layout = Layout(original).with(data, at: 0..<2048).with(write, at: 1024..<4096)
        var buf = [UInt8](repeating: 0, count: 8192)
        buf.withUnsafeMutableBytes { layout.materialize(into: $0) }
        #expect(buf[100] == data.byte(at: 100) && buf[1500] == 0xFF && buf[5000] == original.byte(at: 5000))
        #expect(buf.withUnsafeBytes { layout.matches($0) })
        // A slice, at its offset in the region.
        #expect(buf.withUnsafeBytes { layout.matches(UnsafeRawBufferPointer(rebasing: $0[1000..<5000]), offset: 1000) })
        for i in [0, 1023, 1024, 4095, 4096, 8191] {
            var bad = buf
            bad[i] ^= 1
            #expect(!bad.withUnsafeBytes { layout.matches($0) }, "byte \(i)")
        }
    }

    @Test func patternIsCaseSpecific() {
        let a = Content.original(seed: 1), b = Content.original(seed: 2)
        #expect((0..<64).contains { a.byte(at: $0) != b.byte(at: $0) })
        #expect((0..<64).contains { a.byte(at: $0) != a.byte(at: $0 + 4096) })
    }
}
