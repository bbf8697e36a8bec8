import Glibc

/// Where two buffers of the same length differ.
enum ByteDiff {
    /// The ranges where `a` and `b` differ, runs closer than `gap` bytes
    /// merged into one: the first `max` of them, and how many there are.
    static func ranges(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer, gap: Int, max: Int) -> (ranges: [Range<Int>], total: Int) {
        let n = min(a.count, b.count)
        guard n > 0, let x = a.baseAddress, let y = b.baseAddress else { return ([], 0) }
        var found: [Range<Int>] = []
        var total = 0, i = 0
        while i < n {
            // Equal bytes are skipped a page, then a word at a time (memcmp is vectorised).
            if i & 4095 == 0 && i + 4096 <= n && memcmp(x + i, y + i, 4096) == 0 {
                i += 4096
                continue
            }
            if i & 7 == 0 && i + 8 <= n && memcmp(x + i, y + i, 8) == 0 {
                i += 8
                continue
            }
            if a[i] == b[i] {
                i += 1
                continue
            }
            // [start, end) differs; extend it while the next difference is within `gap`.
            let start = i
            var end = i + 1, j = end
            while j < n && j - end <= gap {
                if a[j] != b[j] { end = j + 1 }
                j += 1
            }
            if found.count < max { found.append(start..<end) }
            total += 1
            i = end
        }
        return (found, total)
    }

    /// How many bytes differ, and how many pages of `pageSize` hold at least one of them.
    static func count(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer, pageSize: Int) -> (bytes: Int, pages: Int) {
        let n = min(a.count, b.count)
        guard n > 0, let x = a.baseAddress, let y = b.baseAddress else { return (0, 0) }
        var bytes = 0, pages = 0
        for page in stride(from: 0, to: n, by: pageSize) {
            let end = Swift.min(page + pageSize, n)
            guard memcmp(x + page, y + page, end - page) != 0 else { continue }
            var here = 0
            for i in page..<end where a[i] != b[i] { here += 1 }
            bytes += here
            if here > 0 { pages += 1 }
        }
        return (bytes, pages)
    }
}
