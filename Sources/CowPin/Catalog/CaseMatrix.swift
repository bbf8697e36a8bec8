/// The whole case matrix in one place: which families of scenarios cowpin
/// runs, which pins the long-term pin events run through, and the named sets
/// of backings they run on. A case is scenario x backing, with the id
/// `<scenario id>/<backing id>`; each scenario lives in its own small file
/// under Scenarios/, each pin under Pins/, each backing under Backings/.
///
/// | family (Scenarios/)   | scenarios                                        | backings                                   |
/// |-----------------------|--------------------------------------------------|--------------------------------------------|
/// | PlainCOW              | cow/fork-child-writes                            | withMTHP                                   |
/// |                       | cow/fork-parent-writes[-mprotect]                | cowMatrix                                  |
/// |                       | cow/collapse-*                                   | thp-pte                                    |
/// | Vmsplice              | vmsplice/unmap-in-child[-mprotect], -in-parent-* | cowMatrix                                  |
/// | LongTermPin x pins    | PIN/EVENT for each LongTermEvent the pin covers  | the pin's PinCoverage (anon, matrix,       |
/// |                       |                                                  | pagecache), zeropages for unpopulated-write|
/// | ODirect               | odirect-{thread,iouring,iouring-fixed}/EVENT     | standard                                   |
/// | FileCOW               | cow/private-file-write                           | privateFiles + the zeropages               |
/// | FilePinning           | longterm-file/iouring-fixed-{shared,private}     | every FileKind, written through the map    |
///
/// | pin (Pins/)                      | events                 | anon / every-shape backings         |
/// |----------------------------------|------------------------|-------------------------------------|
/// | iouring-fixed (R/W)              | all that fit a R/W pin | withMTHP / cowMatrix; pagecache: privateFiles (io_uring's policy asked of the kernel) |
/// | odirect-write (R/O, FOLL_PIN)    | roUnshare              | withMTHP / cowMatrix                |
/// | gup-test-ro, gup-test-ro-fast    | roUnshare + roLongterm | withMTHP / withMTHP                 |
/// | vfio-ro, vfio-rw                 | all that fit           | standard / standard                 |
/// | rdma-ro, rdma-rw                 | all that fit           | standard, swapped, hugetlb / + ksm-page |
extension Catalog {
    /// The long-term pin methods; each runs every long-term pin event its
    /// `coverage` names, on the backings it names.
    public static let pins: [PinMethod] = [
        IoUringFixedPin(),
        ODirectWritePin(),
        GupTestPin(fast: false), GupTestPin(fast: true),
        VFIOPin(writable: false), VFIOPin(writable: true),
        RDMAPin(writable: false), RDMAPin(writable: true),
    ]

    /// Every family of scenarios, in the catalog's order.
    public static let scenarios: [Scenario] =
        PlainCOWCases.scenarios
            + VmspliceCases.scenarios
            + pins.flatMap(LongTermPinCases.scenarios(for:))
            + ODirectCases.scenarios
            + FileCOWCases.scenarios
            + FilePinningCases.scenarios
}

/// The named sets of backings the families and pins run on.
extension Backing {
    /// A base page, a PMD-mapped THP and a PTE-mapped THP: what every
    /// scenario runs on unless it says otherwise.
    public static let standard: [Backing] = [.anonPage, .thpPMD, .thpPTE]

    /// Anonymous memory of every kind cowpin knows: the standard backings, an
    /// mTHP of every size, each of those swapped out, and hugetlb.
    public static let withMTHP: [Backing] = {
        let anon = standard + mthpSizesKB.map(mthp)
        return anon + anon.map { $0.swappedOut() } + [hugetlb(2048), hugetlb(1_048_576)]
    }()

    /// Every shape of every THP size, and the single PTE swapped out (as cow.c runs them).
    public static let thpShapes: [Backing] = thpBases.flatMap { base in
        THPShape.allCases.map { shaped(base, $0) } + [shaped(base, .singlePTE).swappedOut()]
    }

    /// What kselftest mm/cow.c runs its anonymous tests on, and more: every
    /// anonymous backing (withMTHP), every THP shape and a KSM-merged page.
    public static let cowMatrix: [Backing] = withMTHP + thpShapes + [ksmPage]

    /// Every file kind, MAP_PRIVATE and read (the pagecache page mapped).
    public static let privateFiles: [Backing] = FileKind.all.map { file($0, .privateRead) }
}
