/// A way to pin pages the way a driver does, and to read what the pinned
/// pages hold (the device's view).
public protocol PinMethod: Sendable {
    /// Stable id, the first part of a case id ("iouring-fixed").
    var id: String { get }
    var summary: String { get }
    /// R/O pin (no FOLL_WRITE): the hard case of the LKML discussion.
    var readOnly: Bool { get }
    /// What pinning needs of state all processes share (a device only one
    /// process may open, ...): `.none` unless said otherwise.
    var needs: SharedNeeds { get }
    /// Why this pin cannot be used here, or nil.
    func unavailable(_ probe: Probe) -> String?
    /// Pins the whole region.
    func pin(_ region: Region, in ctx: CaseContext) throws -> Pin
}

extension PinMethod {
    public var needs: SharedNeeds { .none }
}

/// A live pin.
public protocol Pin: AnyObject {
    /// The view, for evidence ("pin (io_uring WRITE_FIXED read-back)").
    var view: String { get }
    /// The byte range of the region the view covers (a device may see only a sample).
    var observed: Range<Int> { get }
    /// Reads what the pinned pages hold now in `observed`, as the device
    /// reads them, and passes it to `body` (valid only during the call).
    func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
    /// Drops the pin (idempotent).
    func release()
}
