/// A way to pin pages the way a driver does, and to read what the pinned
/// pages hold (the device's view). A pin method says what it covers
/// (`coverage`): the long-term pin events build its cases from that alone,
/// so a new pin needs no change anywhere else.
public protocol PinMethod: Sendable {
    /// Stable id, the first part of a case id ("iouring-fixed").
    var id: String { get }
    var summary: String { get }
    /// R/O pin (no FOLL_WRITE): the hard case of the LKML discussion.
    var readOnly: Bool { get }
    /// What pinning needs of state all processes share (a device only one
    /// process may open, ...): `.none` unless said otherwise.
    var needs: SharedNeeds { get }
    /// Which long-term pin events it runs, and on which backings: every
    /// event that fits it on every anonymous shape unless said otherwise.
    var coverage: PinCoverage { get }
    /// Why this pin cannot be used here, or nil.
    func unavailable(_ probe: Probe) -> String?
    /// Pins the whole region.
    func pin(_ region: Region, in ctx: CaseContext) throws -> Pin
    /// What the library that takes this pin in real programs claims about
    /// `event` on this kernel (nil: it claims nothing): noted beside the verdict.
    func claim(about event: LongTermEvent, _ probe: Probe) -> PinClaim?
}

extension PinMethod {
    public var needs: SharedNeeds { .none }
    public var coverage: PinCoverage { .full }
    public func claim(about event: LongTermEvent, _ probe: Probe) -> PinClaim? { nil }
}

/// A library's statement about the kernel it runs on (rdma-core's
/// ibv_is_fork_initialized(): fork() needs no ibv_fork_init()).
public struct PinClaim: Sendable, Equatable {
    /// Who claims it ("rdma-core").
    public var source: String
    /// The claim as a line of evidence.
    public var text: String
    /// The claim says the case needs no precaution: a decoherent case contradicts it.
    public var promisesCoherence: Bool

    public init(source: String, text: String, promisesCoherence: Bool) {
        self.source = source
        self.text = text
        self.promisesCoherence = promisesCoherence
    }
}

/// What a pin method runs, as data: the events, the anonymous backings, the
/// backings of the events kselftest mm/cow.c runs on every THP shape, and the
/// file backings of `pagecache-write`.
public struct PinCoverage: Sendable {
    /// The events it runs (of those that fit it: R/O-only events need a R/O pin).
    public var events: Set<LongTermEvent>
    /// The anonymous backings of every event.
    public var anon: [Backing]
    /// The backings of the events mm/cow.c runs on every THP shape
    /// (`LongTermEvent.onEveryShape`).
    public var matrix: [Backing]
    /// The backings of `pagecache-write`: file pages in a MAP_PRIVATE mapping.
    public var pagecache: [Backing]
    /// The device also writes through the pin (`Pin.deviceWrite`): every
    /// event ends with a device write the process must see.
    public var deviceWrites: Bool

    public init(events: Set<LongTermEvent> = Set(LongTermEvent.allCases), anon: [Backing] = Backing.withMTHP,
                matrix: [Backing] = Backing.cowMatrix, pagecache: [Backing] = [Backing.memfdPrivate], deviceWrites: Bool = false) {
        self.events = events
        self.anon = anon
        self.matrix = matrix
        self.pagecache = pagecache
        self.deviceWrites = deviceWrites
    }

    /// Every event that fits, on every mTHP size, swapped out and hugetlb,
    /// and the mm/cow.c events on every THP shape and the KSM page; memfd for
    /// `pagecache-write`.
    public static let full = PinCoverage()
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
    /// Writes `content` over `observed` of the pinned pages, as the device
    /// does, and proves the bytes moved (a transfer that moved nothing is a
    /// harness error). Only for pins whose coverage says `deviceWrites`.
    func deviceWrite(_ content: Content) throws
    /// Drops the pin (idempotent).
    func release()
}

extension Pin {
    public func deviceWrite(_ content: Content) throws {
        throw HarnessError("\(view): the device does not write through this pin")
    }
}
