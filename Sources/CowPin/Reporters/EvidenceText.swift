/// Evidence as human-readable lines (KTAP diagnostics, test failures, text).
public enum EvidenceText {
    public static func lines(_ e: Evidence) -> [String] {
        var out: [String] = []
        for f in e.findings {
            // A finding about the kernel's answer (a pin taken or refused) has no bytes.
            let bytes = f.totalRanges == 0 && f.differingBytes == 0 ? ""
                : "; \(f.differingBytes) byte(s) differ in \(f.differingPages) page(s), \(f.totalRanges) range(s)"
            out.append("\(f.view): expected \(f.expected)\(bytes)")
            out.append("  meaning: \(f.meaning)")
            for r in f.ranges {
                let pages = r.firstPage == r.lastPage ? "page \(r.firstPage)" : "pages \(r.firstPage)-\(r.lastPage)"
                out.append("  [0x\(String(r.offset, radix: 16)), +0x\(String(r.length, radix: 16))) \(pages): seen \(r.seenIs)")
                out.append("    expected: \(r.expectedBytes)")
                out.append("    seen:     \(r.seenBytes)")
            }
            if f.totalRanges > f.ranges.count { out.append("  ... \(f.totalRanges - f.ranges.count) more range(s)") }
        }
        for p in e.pages {
            let pfn = p.pfn.map { "pfn 0x\(String($0, radix: 16))" } ?? "pfn hidden or absent"
            let flags = p.flags.isEmpty ? "" : " [\(p.flags.joined(separator: ","))]"
            out.append("page \(p.page) of \(p.who) \(p.step): \(pfn)\(flags)")
        }
        out += e.notes
        return out
    }
}
