import CCowPin

/// O_DIRECT I/O in flight across fork(): the pages of the user buffer are
/// pinned for as long as the request is in flight. cowpin serves the file
/// itself over FUSE and holds the request, so the window is deterministic:
/// no racing a disk. (open(2) NOTES: O_DIRECT vs fork(); FUSE direct I/O
/// took FOLL_GET references until 6.9, FOLL_PIN since.)
public enum ODirectCases {
    /// What every case served by cowpin's FUSE server requires.
    public static let requirement: @Sendable (Probe) -> String? = { FuseServer.unavailable($0) }

    static func id(_ s: Submitter) -> String {
        switch s {
        case .thread: return "odirect-thread"
        case .iouring: return "odirect-iouring"
        case .iouringFixed: return "odirect-iouring-fixed"
        }
    }

    public static var scenarios: [Scenario] {
        [Submitter.thread, .iouring].flatMap { s in
            [readForkParentWrites(s), readForkChildWrites(s), readForkChildExits(s), readDontforkParentWrites(s),
             writeSharedParentWrites(s), writeSharedUnmapChildWrites(s)]
        } + [readForkParentWrites(.iouringFixed)]
    }

    static let lostReadMeaning = "the read's data did not reach the page the parent maps: after fork() the parent's write made copy-on-write replace the page the read had pinned, and the data went to the old page (the O_DIRECT vs fork() data loss)"

    static func scenario(_ sub: Submitter, _ event: String, _ summary: String, _ steps: [String], tags: [String],
                         _ body: @escaping @Sendable (CaseContext, Region, Submitter) throws -> Void) -> Scenario {
        Scenario(id: "\(id(sub))/\(event)", summary: "O_DIRECT via \(sub.summary): \(summary)", steps: steps,
                 tags: ["odirect", "fuse", id(sub), "fork"] + tags,
                 requires: { requirement($0) }) { ctx in try body(ctx, ctx.region, sub) }
    }

    /// A held O_DIRECT read into the first half of the region's first page.
    struct HeldRead {
        let server: FuseServer
        let io: InFlightIO
        let half: Int

        /// Answers the read and waits (bounded) for it to complete.
        func release(_ ctx: CaseContext) throws {
            try server.releaseRead()
            let n = try io.complete(timeoutMs: ctx.timeoutMs)
            guard n == half else { throw HarnessError("\(io.how) returned \(n), expected \(half) bytes") }
        }

        /// What the parent must see: the read data, then `secondHalf`, then the original.
        func parentLayout(_ ctx: CaseContext, secondHalf: Content) -> Layout {
            Layout(ctx.original).with(server.readData, at: 0..<half).with(secondHalf, at: half..<(2 * half))
        }
    }

    static func startHeldRead(_ ctx: CaseContext, _ sub: Submitter) throws -> HeldRead {
        let region = ctx.region!
        let server = try ctx.fuseServer()
        let fd = try ctx.open(server)
        var ring: IoUring?
        if sub == .iouringFixed {
            ring = try IoUring(entries: 4)
            try ring!.register(region)
        }
        let half = region.pageSize / 2
        server.holdNextRead()
        let io = try sub.start(write: false, fd: fd, address: region.base, length: half, ring: ring)
        try server.awaitHeldRead()
        ctx.notePages("read in flight")
        return HeldRead(server: server, io: io, half: half)
    }

    static func readForkParentWrites(_ sub: Submitter) -> Scenario {
        scenario(sub, "read-fork-parent-writes", "read in flight, fork(), the parent writes the rest of the page",
                 ["start an O_DIRECT read of the first half of page 0; the server holds it (the page is pinned)",
                  "fork(); the child stays alive", "the parent writes 0xff over the second half of page 0",
                  "the server answers the read", "the parent must see the read data and its own write",
                  "the child must see the original content"], tags: []) { ctx, region, sub in
            let read = try startHeldRead(ctx, sub)
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            ctx.parentWrites(range: read.half..<region.pageSize)
            ctx.notePages("after the parent's write")
            ctx.notePages("after the parent's write", child: child)
            try read.release(ctx)
            try child.resume()
            try child.finish()
            ctx.expectParent(holds: read.parentLayout(ctx, secondHalf: ctx.parentWrite), meaning: lostReadMeaning)
            try ctx.expect("child mapping", report: report,
                           meaning: "the read's data landed in the child's copy of the page")
        }
    }

    static func readForkChildWrites(_ sub: Submitter) -> Scenario {
        scenario(sub, "read-fork-child-writes", "read in flight, fork(), the child writes the rest of the page",
                 ["start an O_DIRECT read of the first half of page 0; the server holds it",
                  "fork(); the child writes 0xcc over the second half of page 0", "the server answers the read",
                  "the parent must see the read data and the original second half",
                  "the child must see its write and not the read data"], tags: []) { ctx, region, sub in
            let read = try startHeldRead(ctx, sub)
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region, range: region.pageSize / 2..<region.pageSize)
                c.checkpoint()
                c.verify(region, holds: Layout(ctx.original).with(ctx.childWrite, at: read.half..<region.pageSize), report: report)
            }
            try child.awaitCheckpoint()
            ctx.notePages("after the child's write")
            ctx.notePages("after the child's write", child: child)
            try read.release(ctx)
            try child.resume()
            try child.finish()
            ctx.expectParent(holds: read.parentLayout(ctx, secondHalf: ctx.original), meaning: lostReadMeaning)
            try ctx.expect("child mapping", report: report, meaning: "the read's data or the parent's page leaked into the child")
        }
    }

    static func readForkChildExits(_ sub: Submitter) -> Scenario {
        scenario(sub, "read-fork-child-exits", "read in flight, fork() and the child exits, the parent writes",
                 ["start an O_DIRECT read of the first half of page 0; the server holds it",
                  "fork(); the child exits at once", "the parent writes 0xff over the second half of page 0",
                  "the server answers the read", "the parent must see the read data and its own write"],
                 tags: []) { ctx, region, sub in
            let read = try startHeldRead(ctx, sub)
            let child = try ctx.fork { _ in }
            try child.finish()
            ctx.parentWrites(range: read.half..<region.pageSize)
            ctx.notePages("after the parent's write")
            try read.release(ctx)
            ctx.expectParent(holds: read.parentLayout(ctx, secondHalf: ctx.parentWrite), meaning: lostReadMeaning)
        }
    }

    static func readDontforkParentWrites(_ sub: Submitter) -> Scenario {
        scenario(sub, "read-dontfork-parent-writes", "MADV_DONTFORK buffer, read in flight, fork(), the parent writes (control)",
                 ["madvise(MADV_DONTFORK) on the buffer",
                  "start an O_DIRECT read of the first half of page 0; the server holds it",
                  "fork(); the child stays alive (it does not map the buffer)",
                  "the parent writes 0xff over the second half of page 0", "the server answers the read",
                  "the parent must see the read data and its own write (on every kernel)"],
                 tags: ["control", "dontfork"]) { ctx, region, sub in
            try region.madvise(Int32(CP_MADV_DONTFORK), name: "MADV_DONTFORK")
            let read = try startHeldRead(ctx, sub)
            let child = try ctx.fork { c in c.checkpoint() }
            try child.awaitCheckpoint()
            ctx.parentWrites(range: read.half..<region.pageSize)
            ctx.notePages("after the parent's write")
            try read.release(ctx)
            try child.resume()
            try child.finish()
            ctx.expectParent(holds: read.parentLayout(ctx, secondHalf: ctx.parentWrite),
                             meaning: "the read's data is lost although the buffer is MADV_DONTFORK")
        }
    }

    /// An O_DIRECT write of the first half of page 0, queued (its page pinned R/O).
    static func queuedWrite(_ ctx: CaseContext, _ sub: Submitter) throws -> QueuedWrite {
        let write = try QueuedWrite(ctx, sub, length: ctx.region.pageSize / 2)
        ctx.notePages("write in flight")
        return write
    }

    static func writeSharedParentWrites(_ sub: Submitter) -> Scenario {
        scenario(sub, "write-shared-parent-writes", "write in flight from a COW-shared page, the parent writes it",
                 ["fork(); the child stays alive, so page 0 is COW-shared",
                  "start an O_DIRECT write of the first half of page 0; the server does not read it yet (an R/O pin)",
                  "the parent writes 0xff over page 0", "the server reads the request",
                  "the server must receive the parent's current content: the pinned page is the mapped page"],
                 tags: ["ro-pin"]) { ctx, region, sub in
            let child = try ctx.fork { c in c.checkpoint() }
            try child.awaitCheckpoint()
            let write = try queuedWrite(ctx, sub)
            ctx.parentWrites(range: 0..<region.pageSize)
            ctx.notePages("after the parent's write")
            try ctx.expect(write, holds: ctx.parentWrite,
                           meaning: "the server received the content from before the parent's write: the write pinned the COW-shared page without unsharing it, and the parent's write went to a new page")
            try child.resume()
            try child.finish()
        }
    }

    static func writeSharedUnmapChildWrites(_ sub: Submitter) -> Scenario {
        scenario(sub, "write-shared-unmap-child-writes", "write in flight from a COW-shared page, the parent unmaps, the child writes",
                 ["fork(); the child stays alive, so page 0 is COW-shared",
                  "start an O_DIRECT write of the first half of page 0; the server does not read it yet",
                  "the parent munmap()s the buffer", "the child writes 0xcc over page 0", "the server reads the request",
                  "the server must receive the original content, never the child's data"],
                 tags: ["ro-pin", "leak"]) { ctx, region, sub in
            let child = try ctx.fork { c in
                c.checkpoint()
                c.write(0xCC, to: region, range: 0..<region.pageSize)
                c.checkpoint()
            }
            try child.awaitCheckpoint()
            let write = try queuedWrite(ctx, sub)
            try region.unmap()
            try child.resume()
            try child.awaitCheckpoint()
            ctx.notePages("after the child's write", child: child)
            try ctx.expect(write, holds: ctx.original,
                           meaning: "the child's write reached the server through the parent's O_DIRECT write: data leaks from the child")
            try child.resume()
            try child.finish()
        }
    }
}

extension CaseContext {
    /// The process's FUSE server, reset for this case (mounted if there is
    /// none). When the case ends, after its children are gone and its file is
    /// closed, a server the case left in a doubtful state (a request held, a
    /// wait that timed out) is shut down (connection aborted, unmounted).
    public func fuseServer() throws -> FuseServer {
        let server = try FuseServer.forCase(seed: original.hashSeed, timeoutMs: timeoutMs)
        onCleanup { FuseServer.endCase(server) }
        extraCandidates.append(server.readData)
        return server
    }

    /// Opens the server's file with O_DIRECT, closed when the case ends.
    public func open(_ server: FuseServer) throws -> Int32 {
        let fd = try server.openFile()
        onCleanup { _ = cp_close(fd) }
        return fd
    }
}
