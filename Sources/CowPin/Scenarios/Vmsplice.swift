import CCowPin

/// vmsplice() holds a reference to the pages in a pipe (an R/O GUP pin that
/// the pipe keeps). Reading the pipe later must give the data as it was at
/// vmsplice() time, whatever the processes write afterwards
/// (kselftest mm/cow.c "vmsplice() + unmap in child/parent"; CVE-2020-29374).
public enum VmspliceCases {
    public static let scenarios: [Scenario] = [
        inChild(mprotect: false),
        inChild(mprotect: true),
        inParent(beforeFork: true),
        inParent(beforeFork: false),
    ]

    /// kselftest mm/cow.c expects vmsplice() on hugetlb to fail.
    static let hugetlbIssue = KnownIssue(
        reason: "vmsplice() of hugetlb pages is not protected against COW (no unsharing for hugetlb)",
        reference: "unfixed upstream; kselftest mm/cow.c reports hugetlb + vmsplice as XFAIL",
        backings: ["hugetlb-2048k"])

    /// Pipes that hold the whole region.
    static func pipes(for region: Region) throws -> SplicePipes {
        try SplicePipes(covering: region.size, pageSize: region.pageSize)
    }

    static func inChild(mprotect: Bool) -> Scenario {
        Scenario(
            id: "vmsplice/unmap-in-child" + (mprotect ? "-mprotect" : ""),
            summary: "the child vmsplice()s the shared page and unmaps it, the parent writes" + (mprotect ? " after an mprotect() cycle" : ""),
            steps: ["fork()", "the child vmsplice()s its view into a pipe and munmap()s it"]
                + (mprotect ? ["the parent calls mprotect(PROT_READ), then mprotect(PROT_READ|PROT_WRITE)"] : [])
                + ["the parent writes 0xff", "the child reads the pipe: must hold the original content"],
            tags: ["vmsplice", "ro-pin", "fork"] + (mprotect ? ["mprotect"] : []), backings: Backing.cowMatrix, knownIssue: hugetlbIssue
        ) { ctx in
            let region = ctx.region!
            let pipes = try pipes(for: region)
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.vmsplice(region, into: pipes)
                c.unmap(region)
                c.checkpoint()
                c.verify(pipes, hold: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            let moved = child.results(of: "vmsplice")
            guard moved == pipes.ranges.map({ Int64($0.count) }) else {
                throw HarnessError("vmsplice moved \(moved) bytes, expected \(pipes.ranges.map(\.count))")
            }
            if mprotect {
                try region.mprotect(Int32(CP_PROT_READ))
                try region.mprotect(Int32(CP_PROT_READ_WRITE))
            }
            ctx.parentWrites()
            ctx.notePages("after the parent's write")
            try child.resume()
            try child.finish()
            try ctx.expect("pipe (vmsplice()d by the child, read by the child)", report: report,
                           meaning: "the parent's write reached the page the child's pipe holds: the parent reused a page that was still referenced (data leaks from parent to child)")
        }
    }

    static func inParent(beforeFork: Bool) -> Scenario {
        Scenario(
            id: "vmsplice/unmap-in-parent-" + (beforeFork ? "before-fork" : "after-fork"),
            summary: "the parent vmsplice()s the page \(beforeFork ? "before" : "after") fork() and unmaps it, the child writes",
            steps: (beforeFork ? ["the parent vmsplice()s the region into a pipe", "fork()"]
                               : ["fork()", "the parent vmsplice()s the region into a pipe"])
                + ["the parent munmap()s the region", "the child writes 0xcc and exits",
                   "the parent reads the pipe: must hold the original content"],
            tags: ["vmsplice", "ro-pin", "fork", "leak"], backings: Backing.cowMatrix, knownIssue: hugetlbIssue
        ) { ctx in
            let region = ctx.region!
            let pipes = try pipes(for: region)
            if beforeFork { try pipes.splice(region) }
            let child = try ctx.fork { c in
                c.checkpoint()
                c.write(0xCC, to: region)
            }
            try child.awaitCheckpoint()
            if !beforeFork { try pipes.splice(region) }
            ctx.notePages("before unmap")
            try region.unmap()
            try child.resume()
            try child.finish()
            try pipes.withContents(timeoutMs: ctx.timeoutMs) { seen in
                ctx.expect("pipe (vmsplice()d by the parent)", holds: ctx.original, seen: seen,
                           meaning: "the child's write reached the page the parent's pipe holds: data leaks from child to parent")
            }
        }
    }
}
