import CCowPin

/// A child's report on its view of the region, in memory shared with it.
/// `ChildProgram.verify` writes down, before fork(), what the view should
/// hold; the child checks its view in place and copies it here only when it
/// differs. A view that matches costs one pass over it in the child and
/// nothing in the parent; one that differs is compared by the parent exactly
/// as any other view (`CaseContext.expect(_:report:meaning:)`).
///
/// Until the child has checked, the report says it has none: a child that
/// died, or never got that far, is never taken for a match.
public final class ChildReport {
    private let buffer: SharedBuffer
    /// The view of region offset 0 would sit here in the buffer (after the header, page-aligned).
    private let dataOffset: Int
    /// The size of the region the report covers.
    public let size: Int
    /// What the view should hold, and the region offsets it covers (set by `ChildProgram.verify`).
    public private(set) var expected: Layout?
    public private(set) var range: Range<Int> = 0..<0

    init(size: Int, pageSize: Int) throws {
        dataOffset = (MemoryLayout<cp_report>.size + pageSize - 1) / pageSize * pageSize
        buffer = try SharedBuffer(size: dataOffset + size)
        self.size = size
        // A reused buffer holds an old report: this one has none yet.
        header.pointee = cp_report()
    }

    var header: UnsafeMutablePointer<cp_report> { buffer.base.assumingMemoryBound(to: cp_report.self) }

    /// Where region offset `offset` of the view goes in the buffer.
    func data(at offset: Int) -> UnsafeMutableRawPointer { buffer.base + dataOffset + offset }

    /// Writes down, before fork(), that the view of `range` must hold
    /// `expected`; a view that differs is copied to `data(at: range.lowerBound)`
    /// (unless the view is that buffer already). Layouts of more stretches
    /// than the header holds are copied without being checked by the child.
    func prepare(_ expected: Layout, range: Range<Int>) -> UnsafeMutablePointer<cp_report> {
        precondition(self.expected == nil, "a report is made once")
        precondition(range.lowerBound >= 0 && range.upperBound <= size)
        self.expected = expected
        self.range = range
        let stretches = expected.stretches(offset: range.lowerBound, count: range.count)
        var h = cp_report()
        h.offset = UInt64(range.lowerBound)
        h.length = UInt64(range.count)
        h.copy_to = data(at: range.lowerBound)
        if stretches.count <= Int(CP_MAX_STRETCHES) {
            h.count = UInt32(stretches.count)
            withUnsafeMutableBytes(of: &h.stretch) { raw in
                let out = raw.bindMemory(to: cp_stretch.self)
                for (i, s) in stretches.enumerated() {
                    let (kind, value): (cp_content_kind, UInt32)
                    switch s.content.kind {
                    case .fill(let b): (kind, value) = (CP_CONTENT_FILL, UInt32(b))
                    case .pattern(let seed): (kind, value) = (CP_CONTENT_PATTERN, seed)
                    }
                    out[i] = cp_stretch(offset: UInt64(s.range.lowerBound), length: UInt64(s.range.count),
                                        kind: kind.rawValue, value: value)
                }
            }
        }
        header.pointee = h
        return header
    }

    /// What the child reported.
    public enum Outcome {
        /// No report: the child died first, or its program never got there.
        case none
        /// The view held exactly what it should.
        case matches
        /// The view, as the child saw it (region offsets `range`).
        case copied(UnsafeRawBufferPointer)
    }

    public var outcome: Outcome {
        switch cp_report_status(header) {
        case CP_REPORT_MATCHES.rawValue: return .matches
        case CP_REPORT_COPIED.rawValue: return .copied(UnsafeRawBufferPointer(start: data(at: range.lowerBound), count: range.count))
        default: return .none
        }
    }
}
