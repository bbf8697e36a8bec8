import CCowPin
import Glibc

/// Copy-on-write after fork() with no pin at all: the baseline every other
/// family builds on (kselftest mm/cow.c "Basic COW after fork()").
public enum PlainCOWCases {
    public static let scenarios: [Scenario] = [
        parentWrites(mprotect: false),
        parentWrites(mprotect: true),
        collapse(.beforeFork), collapse(.fullyShared), collapse(.lowerShared), collapse(.upperShared),
        Scenario(
            id: "cow/fork-child-writes", summary: "COW after fork(), the child writes",
            steps: ["fork()", "the child writes 0xcc over its view and reports it",
                    "the parent's mapping must still hold the original content"],
            tags: ["cow", "fork", "nopin"], backings: Backing.withMTHP
        ) { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region)
                c.verify(region, holds: ctx.childWrite, report: report)
                c.checkpoint()
            }
            try child.awaitCheckpoint()
            ctx.notePages("after the child's write")
            ctx.notePages("after the child's write", child: child)
            ctx.expectParent(holds: ctx.original, meaning: "the child's write reached the parent: COW did not copy the page")
            try ctx.expect("child mapping", report: report, meaning: "the child's own write is lost")
            try child.resume()
            try child.finish()
        },
    ]

    static func parentWrites(mprotect: Bool) -> Scenario {
        Scenario(
            id: mprotect ? "cow/fork-parent-writes-mprotect" : "cow/fork-parent-writes",
            summary: "COW after fork(), the parent writes" + (mprotect ? " after an mprotect() R/O -> R/W cycle" : ""),
            steps: ["fork(); the child stays alive"]
                + (mprotect ? ["the parent calls mprotect(PROT_READ), then mprotect(PROT_READ|PROT_WRITE)"] : [])
                + ["the parent writes 0xff", "the child reports its view: must hold the original content"],
            tags: ["cow", "fork", "nopin"] + (mprotect ? ["mprotect"] : []), backings: Backing.cowMatrix
        ) { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            ctx.noteHugetlbPool("after fork()")
            if mprotect {
                try region.mprotect(Int32(CP_PROT_READ))
                try region.mprotect(Int32(CP_PROT_READ_WRITE))
            }
            ctx.parentWrites()
            ctx.notePages("after the parent's write")
            ctx.notePages("after the parent's write", child: child)
            ctx.noteHugetlbPool("after the parent's write")
            try child.resume()
            try child.finish()
            try ctx.expect("child mapping", report: report,
                           meaning: "the child no longer holds what it had at fork(): the parent's write reached it (COW did not copy the page), or its page was taken from it")
            ctx.expectParent(holds: ctx.parentWrite, meaning: "the parent's own write is lost")
        }
    }

    /// When MADV_COLLAPSE turns a PTE-mapped THP back into a PMD-mapped one,
    /// relative to fork() (kselftest mm/cow.c "... when collapsing ...").
    enum CollapseTime: String {
        case beforeFork = "collapse-before-fork"
        case fullyShared = "collapse-after-fork-fully-shared"
        case lowerShared = "collapse-after-fork-lower-shared"
        case upperShared = "collapse-after-fork-upper-shared"
    }

    static func collapse(_ when: CollapseTime) -> Scenario {
        let sharing: String
        switch when {
        case .beforeFork: sharing = "MADV_COLLAPSE the PTE-mapped THP, then fork(); the child stays alive"
        case .fullyShared: sharing = "fork(); the child stays alive; MADV_COLLAPSE in the parent (all of it COW-shared)"
        case .lowerShared: sharing = "MADV_DONTFORK the upper half, fork(), MADV_DOFORK, MADV_COLLAPSE in the parent (the lower half is shared)"
        case .upperShared: sharing = "MADV_DONTFORK the lower half, fork(), MADV_DOFORK, MADV_COLLAPSE in the parent (the upper half is shared)"
        }
        return Scenario(
            id: "cow/\(when.rawValue)", summary: "COW after fork() and MADV_COLLAPSE, the parent writes",
            steps: [sharing, "the parent writes 0xff over the whole THP", "the child reports what it shares: must hold the original content"],
            tags: ["cow", "fork", "nopin", "collapse"], backings: [.thpPTE]
        ) { ctx in
            let region = ctx.region!
            let half = region.size / 2
            func collapse() throws {
                // EAGAIN is transient (a page locked, or off the LRU for a
                // moment, e.g. in another CPU's LRU batch): retried, bounded.
                var r = cp_madvise(region.base, region.size, Int32(CP_MADV_COLLAPSE))
                for _ in 0..<100 where r == -EAGAIN {
                    usleep(1_000)
                    r = cp_madvise(region.base, region.size, Int32(CP_MADV_COLLAPSE))
                }
                if r == -EAGAIN { throw CaseSkip("MADV_COLLAPSE still failed with EAGAIN (temporary) after 100 tries, 1 ms apart") }
                if r == -EINVAL {
                    if let v = KernelVersion(ctx.probe.kernel.release), v < KernelVersion("6.1")! {
                        throw CaseSkip("MADV_COLLAPSE is not supported (EINVAL; added in 6.1)")
                    }
                    throw CaseSkip("MADV_COLLAPSE refused to collapse this \(when == .beforeFork ? "" : "COW-shared ")THP (EINVAL)")
                }
                try check("madvise(MADV_COLLAPSE)", r)
            }
            let notForked: Range<Int>? = when == .lowerShared ? half..<region.size : when == .upperShared ? 0..<half : nil
            let shared = notForked.map { $0.lowerBound == 0 ? half..<region.size : 0..<half } ?? 0..<region.size
            if when == .beforeFork { try collapse() }
            if let r = notForked { try region.madvise(Int32(CP_MADV_DONTFORK), name: "MADV_DONTFORK", range: r) }
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report, range: shared)
            }
            try child.awaitCheckpoint()
            if let r = notForked { try region.madvise(Int32(CP_MADV_DOFORK), name: "MADV_DOFORK", range: r) }
            if when != .beforeFork { try collapse() }
            ctx.parentWrites()
            ctx.notePages("after collapse and the parent's write")
            ctx.notePages("after collapse and the parent's write", child: child)
            try child.resume()
            try child.finish()
            try ctx.expect("child mapping (the shared part)", report: report,
                           meaning: "the parent's write reached the child: the collapsed THP was not copied on write")
            ctx.expectParent(holds: ctx.parentWrite, meaning: "the parent's own write is lost")
        }
    }
}
