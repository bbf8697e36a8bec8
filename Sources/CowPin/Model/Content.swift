import CCowPin

/// What a range of memory is supposed to hold. Every actor writes something
/// recognisable, so a mismatch can say whose data ended up where.
public struct Content: Equatable, Sendable, CustomStringConvertible {
    enum Kind: Equatable, Sendable {
        case pattern(seed: UInt32)
        case fill(UInt8)
    }

    let kind: Kind
    /// Whose data this is, for evidence ("the parent's write").
    public let label: String

    /// The case's initial content: a position-dependent pattern unique to the case.
    public static func original(seed: UInt32) -> Content {
        Content(kind: .pattern(seed: seed), label: "the original content")
    }

    public static func written(_ byte: UInt8, by who: String) -> Content {
        Content(kind: .fill(byte), label: "\(who)'s write (0x\(hex(byte)))")
    }

    public static let zero = Content(kind: .fill(0), label: "zeroes")

    /// Another pattern (e.g. the data a file server returns), labelled by whose it is.
    public static func pattern(seed: UInt32, label: String) -> Content {
        Content(kind: .pattern(seed: seed), label: label)
    }

    public var description: String { label }

    /// A number derived from this content, to seed related contents.
    public var hashSeed: UInt32 {
        switch kind {
        case .pattern(let seed): return seed
        case .fill(let b): return UInt32(b)
        }
    }

    /// Writes this content into `buffer`, as it would sit at `offset` in the region.
    public func materialize(into buffer: UnsafeMutableRawBufferPointer, offset: Int = 0) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        switch kind {
        case .pattern(let seed): cp_fill_pattern(base, buffer.count, seed, offset)
        case .fill(let b): base.initializeMemory(as: UInt8.self, repeating: b, count: buffer.count)
        }
    }

    /// Whether `bytes` (found at `offset` in the region) are exactly this content.
    public func matches(_ bytes: UnsafeRawBufferPointer, offset: Int) -> Bool {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return true }
        switch kind {
        case .pattern(let seed): return cp_matches_pattern(base, bytes.count, seed, offset) != 0
        case .fill(let b): return cp_all_equal(base, bytes.count, b) != 0
        }
    }

    public func byte(at offset: Int) -> UInt8 {
        switch kind {
        case .pattern(let seed): return cp_pattern_byte(seed, offset)
        case .fill(let b): return b
        }
    }
}

/// What a whole buffer should hold: a base content with other contents laid
/// over some byte ranges (e.g. read data in the first half of a page).
public struct Layout: Equatable, Sendable, CustomStringConvertible {
    public struct Overlay: Equatable, Sendable {
        public var range: Range<Int>
        public var content: Content
    }

    public var base: Content
    public var overlays: [Overlay] = []

    public init(_ base: Content) { self.base = base }

    /// This layout with `content` over `range` (later overlays win).
    public func with(_ content: Content, at range: Range<Int>) -> Layout {
        var l = self
        l.overlays.append(Overlay(range: range, content: content))
        return l
    }

    public var description: String {
        guard !overlays.isEmpty else { return base.label }
        let parts = overlays.map { "\($0.content.label) at [0x\(String($0.range.lowerBound, radix: 16)), 0x\(String($0.range.upperBound, radix: 16)))" }
        return parts.joined(separator: ", ") + ", \(base.label) elsewhere"
    }

    /// Writes what [offset, offset + buffer.count) of the region should hold.
    public func materialize(into buffer: UnsafeMutableRawBufferPointer, offset: Int = 0) {
        base.materialize(into: buffer, offset: offset)
        for o in overlays {
            let r = o.range.clamped(to: offset..<(offset + buffer.count))
            guard !r.isEmpty else { continue }
            let local = (r.lowerBound - offset)..<(r.upperBound - offset)
            o.content.materialize(into: UnsafeMutableRawBufferPointer(rebasing: buffer[local]), offset: r.lowerBound)
        }
    }

    /// [offset, offset + count) split at the overlay edges: each stretch
    /// belongs to one content (the last overlay covering it, else the base).
    public func stretches(offset: Int, count: Int) -> [(range: Range<Int>, content: Content)] {
        let whole = offset..<(offset + count)
        if overlays.isEmpty { return whole.isEmpty ? [] : [(whole, base)] }
        var edges = [whole.lowerBound, whole.upperBound]
        for o in overlays {
            let r = o.range.clamped(to: whole)
            if !r.isEmpty { edges += [r.lowerBound, r.upperBound] }
        }
        edges = Array(Set(edges)).sorted()
        return zip(edges, edges.dropFirst()).map { lo, hi in
            (lo..<hi, overlays.last { $0.range.contains(lo) }?.content ?? base)
        }
    }

    /// Whether `bytes`, found at `offset` in the region, hold this layout
    /// (each stretch is checked in place).
    public func matches(_ bytes: UnsafeRawBufferPointer, offset: Int = 0) -> Bool {
        stretches(offset: offset, count: bytes.count).allSatisfy { r, owner in
            owner.matches(UnsafeRawBufferPointer(rebasing: bytes[(r.lowerBound - offset)..<(r.upperBound - offset)]), offset: r.lowerBound)
        }
    }
}

func hex(_ b: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(b >> 4)], digits[Int(b & 15)]])
}

func hexBytes(_ bytes: UnsafeRawBufferPointer) -> String {
    bytes.map(hex).joined(separator: " ")
}

/// Compares what a view holds with what it should hold.
public enum Comparison {
    /// Differences closer than this are reported as one range.
    static let mergeGap = 32
    static let shownBytes = 16

    /// nil when `seen` holds exactly `expected`; otherwise a finding that
    /// names, for each differing range, which of `candidates` it holds.
    public static func compare(
        view: String, seen: UnsafeRawBufferPointer, expected: Content,
        candidates: [Content], meaning: String, pageSize: Int
    ) -> Finding? {
        compare(view: view, seen: seen, expected: Layout(expected), candidates: candidates, meaning: meaning, pageSize: pageSize)
    }

    /// `seen` is what the view holds at [offset, offset + seen.count) of the region
    /// (offset page-aligned); ranges and pages in the finding are region offsets.
    public static func compare(
        view: String, seen: UnsafeRawBufferPointer, expected: Layout,
        candidates: [Content], meaning: String, pageSize: Int, offset base: Int = 0
    ) -> Finding? {
        let n = seen.count
        if expected.matches(seen, offset: base) { return nil }
        let want = UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, 1), alignment: 8)
        defer { want.deallocate() }
        expected.materialize(into: UnsafeMutableRawBufferPointer(rebasing: want[0..<n]), offset: base)
        let w = UnsafeRawBufferPointer(want)
        let (found, total) = ByteDiff.ranges(w, seen, gap: mergeGap, max: Finding.maxRanges)
        let (differing, pages) = ByteDiff.count(w, seen, pageSize: pageSize)
        let ranges = found.map { r -> DiffRange in
            let off = r.lowerBound, len = r.count
            let slice = UnsafeRawBufferPointer(rebasing: seen[off..<(off + len)])
            let shown = min(len, shownBytes)
            let who = candidates.first { $0.matches(slice, offset: base + off) }?.label ?? "unrecognised"
            return DiffRange(
                offset: base + off, length: len,
                firstPage: (base + off) / pageSize, lastPage: (base + off + len - 1) / pageSize,
                expectedBytes: hexBytes(UnsafeRawBufferPointer(rebasing: w[off..<(off + shown)])),
                seenBytes: hexBytes(UnsafeRawBufferPointer(rebasing: seen[off..<(off + shown)])),
                seenIs: who)
        }
        return Finding(
            view: view, expected: expected.description, meaning: meaning,
            differingBytes: differing, differingPages: pages,
            totalRanges: total, ranges: Array(ranges))
    }
}
