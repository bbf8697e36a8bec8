import Glibc

/// How the supervisor names the selection to its worker: index ranges into
/// `Catalog.all` ("0-20,25"), short whatever the selection (800 case ids as
/// arguments cost the worker's argument parsing 60 ms), and a digest of the
/// ids that the worker checks.
public enum WorkerSelection {
    public static func ranges(_ cases: [Case]) -> String {
        var index: [String: Int] = [:]
        for (i, c) in Catalog.all.enumerated() { index[c.id] = i }
        var parts: [String] = []
        var run: (first: Int, last: Int)?
        func flush() {
            guard let r = run else { return }
            parts.append(r.first == r.last ? "\(r.first)" : "\(r.first)-\(r.last)")
        }
        for c in cases {
            let i = index[c.id] ?? -1
            if let r = run, i == r.last + 1 {
                run = (r.first, i)
            } else {
                flush()
                run = (i, i)
            }
        }
        flush()
        return parts.joined(separator: ",")
    }

    /// The cases `ranges` names; nil when it does not parse or names no case.
    public static func cases(_ ranges: String) -> [Case]? {
        let all = Catalog.all
        var out: [Case] = []
        for part in ranges.split(separator: ",", omittingEmptySubsequences: false) {
            let ends = part.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false).map { Int($0) }
            guard let first = ends.first ?? nil, let last = ends.last ?? nil, 0 <= first, first <= last, last < all.count else { return nil }
            out += all[first...last]
        }
        return out.isEmpty ? nil : out
    }

    /// FNV-1a over the ids, hex.
    public static func digest(_ cases: [Case]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for c in cases {
            for b in c.id.utf8 + [0] {
                h ^= UInt64(b)
                h = h &* 0x100_0000_01b3
            }
        }
        return String(h, radix: 16)
    }
}
