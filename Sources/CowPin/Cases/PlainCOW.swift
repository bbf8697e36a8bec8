import CCowPin

/// Copy-on-write after fork() with no pin at all: the baseline every other
/// family builds on (kselftest mm/cow.c "Basic COW after fork()").
public enum PlainCOWCases {
    public static let scenarios: [Scenario] = [
        parentWrites(mprotect: false),
        parentWrites(mprotect: true),
        Scenario(
            id: "cow/fork-child-writes", summary: "COW after fork(), the child writes",
            steps: ["fork()", "the child writes 0xcc over its view and reports it",
                    "the parent's mapping must still hold the original content"],
            tags: ["cow", "fork", "nopin"], backings: Backing.withMTHP
        ) { ctx in
            let region = ctx.region!
            let report = try ctx.sharedBuffer()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region)
                c.report(region, into: report)
                c.checkpoint()
            }
            try child.awaitCheckpoint()
            ctx.notePages("after the child's write")
            ctx.notePages("after the child's write", child: child)
            ctx.expectParent(holds: ctx.original, meaning: "the child's write reached the parent: COW did not copy the page")
            ctx.expect("child mapping", holds: ctx.childWrite, seen: report.bytes, meaning: "the child's own write is lost")
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
            tags: ["cow", "fork", "nopin"] + (mprotect ? ["mprotect"] : []), backings: Backing.withMTHP
        ) { ctx in
            let region = ctx.region!
            let report = try ctx.sharedBuffer()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.report(region, into: report)
            }
            try child.awaitCheckpoint()
            if mprotect {
                try region.mprotect(Int32(CP_PROT_READ))
                try region.mprotect(Int32(CP_PROT_READ_WRITE))
            }
            ctx.parentWrites()
            ctx.notePages("after the parent's write")
            ctx.notePages("after the parent's write", child: child)
            try child.resume()
            try child.finish()
            ctx.expect("child mapping", holds: ctx.original, seen: report.bytes,
                       meaning: "the parent's write reached the child: COW did not copy the page")
            ctx.expectParent(holds: ctx.parentWrite, meaning: "the parent's own write is lost")
        }
    }
}
