import CCowPin
import Glibc
import SystemPackage

/// The server thread: reads requests from /dev/fuse and answers them, holding
/// a READ or leaving requests queued (the gate) when the case asks.
extension FuseServer {
    func serve() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.maxWrite + 65536, alignment: 16)
        defer {
            buffer.deallocate()
            notify(.exited)
        }
        while true {
            let gateOpen = state.with { $0.gateOpen }
            var fds = [pollfd(fd: commands.readEnd, events: Int16(POLLIN), revents: 0)]
            if gateOpen { fds.append(pollfd(fd: devFD.rawValue, events: Int16(POLLIN), revents: 0)) }
            let r = poll(&fds, nfds_t(fds.count), -1)
            if r < 0 {
                if errno == EINTR { continue }
                state.with { $0.failure = "poll: \(Errno.name(errno))" }
                return
            }
            if fds[0].revents != 0 {
                var c: UInt8 = 0
                guard read(commands.readEnd, &c, 1) == 1 else { return }
                switch c {
                case 0x51: return // quit
                case 0x47: notify(.gateClosed)
                case 0x52: replyHeldRead()
                default: break
                }
                continue // re-check the gate before reading /dev/fuse
            }
            if fds.count > 1 && fds[1].revents != 0 {
                let n: Int
                do {
                    n = try devFD.read(into: buffer, retryOnInterrupt: false)
                } catch let e as Errno {
                    if e == .interrupted || e == .noSuchFileOrDirectory || e == .resourceTemporarilyUnavailable { continue }
                    state.with { $0.failure = "read(/dev/fuse): \(e.name)" }
                    return
                } catch {
                    return
                }
                handle(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            }
        }
    }

    func handle(_ req: UnsafeRawBufferPointer) {
        guard req.count >= MemoryLayout<fuse_in_header>.size else { return }
        let h = req.loadUnaligned(as: fuse_in_header.self)
        let body = UnsafeRawBufferPointer(rebasing: req[MemoryLayout<fuse_in_header>.size...])
        state.with { $0.seen.append(h.opcode) }
        switch h.opcode {
        case FUSE_INIT.rawValue:
            let i = body.loadUnaligned(as: fuse_init_in.self)
            var o = fuse_init_out()
            o.major = UInt32(FUSE_KERNEL_VERSION)
            o.minor = min(i.minor, UInt32(FUSE_KERNEL_MINOR_VERSION))
            o.max_readahead = i.max_readahead
            o.max_write = UInt32(Self.maxWrite)
            o.max_background = 16
            o.congestion_threshold = 12
            o.time_gran = 1
            reply(h.unique, o)
            notify(.initialized)
        case FUSE_LOOKUP.rawValue:
            let name = String(decoding: body.prefix { $0 != 0 }, as: UTF8.self)
            guard h.nodeid == Self.rootNode, name == Self.fileName else { return replyError(h.unique, ENOENT) }
            var o = fuse_entry_out()
            o.nodeid = Self.fileNode
            o.generation = 1
            o.entry_valid = 3600
            o.attr_valid = 3600
            o.attr = attributes(Self.fileNode)
            reply(h.unique, o)
        case FUSE_GETATTR.rawValue:
            guard h.nodeid == Self.rootNode || h.nodeid == Self.fileNode else { return replyError(h.unique, ENOENT) }
            var o = fuse_attr_out()
            o.attr_valid = 3600
            o.attr = attributes(h.nodeid)
            reply(h.unique, o)
        case FUSE_OPEN.rawValue:
            var o = fuse_open_out()
            o.fh = state.with { s -> UInt64 in
                s.opens += 1
                defer { s.nextHandle += 1 }
                return s.nextHandle
            }
            o.open_flags = UInt32(FOPEN_DIRECT_IO)
            reply(h.unique, o)
        case FUSE_READ.rawValue:
            let i = body.loadUnaligned(as: fuse_read_in.self)
            let hold = state.with { s -> Bool in
                guard i.fh >= s.caseHandles else {
                    s.strays += 1
                    return false
                }
                guard s.holdReads else { return false }
                s.holdReads = false
                s.heldRead = (h.unique, Int(i.offset), Int(i.size))
                return true
            }
            if hold {
                notify(.readHeld)
            } else {
                replyRead(h.unique, offset: Int(i.offset), size: Int(i.size))
            }
        case FUSE_WRITE.rawValue:
            let i = body.loadUnaligned(as: fuse_write_in.self)
            let dataStart = MemoryLayout<fuse_write_in>.size
            let data = Array(body[dataStart..<min(body.count, dataStart + Int(i.size))])
            let current = state.with { s -> Bool in
                guard i.fh >= s.caseHandles else {
                    s.strays += 1
                    return false
                }
                s.writes.append((Int(i.offset), data))
                return true
            }
            var o = fuse_write_out()
            o.size = UInt32(data.count)
            reply(h.unique, o)
            if current { notify(.writeReceived) }
        case FUSE_RELEASE.rawValue:
            state.with { $0.releases += 1 }
            replyEmpty(h.unique)
            notify(.released)
        case FUSE_RELEASEDIR.rawValue:
            replyEmpty(h.unique)
        case FUSE_FORGET.rawValue, FUSE_BATCH_FORGET.rawValue, FUSE_INTERRUPT.rawValue:
            break // no reply
        case FUSE_DESTROY.rawValue:
            replyEmpty(h.unique)
        default:
            // FLUSH included: ENOSYS makes the kernel stop sending it, so a
            // child's exit (closing its copy of the file) never waits on us.
            replyError(h.unique, ENOSYS)
        }
    }

    static func opcodeName(_ op: UInt32) -> String {
        let names: [UInt32: String] = [
            FUSE_LOOKUP.rawValue: "LOOKUP", FUSE_FORGET.rawValue: "FORGET", FUSE_GETATTR.rawValue: "GETATTR",
            FUSE_OPEN.rawValue: "OPEN", FUSE_READ.rawValue: "READ", FUSE_WRITE.rawValue: "WRITE",
            FUSE_RELEASE.rawValue: "RELEASE", FUSE_FLUSH.rawValue: "FLUSH", FUSE_INIT.rawValue: "INIT",
            FUSE_INTERRUPT.rawValue: "INTERRUPT", FUSE_DESTROY.rawValue: "DESTROY", FUSE_BATCH_FORGET.rawValue: "BATCH_FORGET",
        ]
        return names[op] ?? "op\(op)"
    }

    func attributes(_ node: UInt64) -> fuse_attr {
        var a = fuse_attr()
        a.ino = node
        if node == Self.rootNode {
            a.mode = 0o040755 // S_IFDIR | 0755
            a.nlink = 2
        } else {
            a.mode = 0o100644 // S_IFREG | 0644
            a.nlink = 1
            a.size = UInt64(Self.fileSize)
            a.blocks = UInt64(Self.fileSize / 512)
        }
        a.uid = getuid()
        a.gid = getgid()
        a.blksize = 4096
        return a
    }

    func replyHeldRead() {
        guard let r = state.with({ s -> (unique: UInt64, offset: Int, size: Int)? in
            defer { s.heldRead = nil }
            return s.heldRead
        }) else { return }
        replyRead(r.unique, offset: r.offset, size: r.size)
    }

    func replyRead(_ unique: UInt64, offset: Int, size: Int) {
        let n = max(0, min(size, Self.fileSize - offset))
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, 1), alignment: 8)
        defer { data.deallocate() }
        readData.materialize(into: UnsafeMutableRawBufferPointer(rebasing: data[0..<n]), offset: offset)
        send(unique, error: 0, UnsafeRawBufferPointer(rebasing: data[0..<n]))
    }

    func reply<T>(_ unique: UInt64, _ value: T) {
        var v = value
        withUnsafeBytes(of: &v) { send(unique, error: 0, $0) }
    }

    func replyEmpty(_ unique: UInt64) { send(unique, error: 0, UnsafeRawBufferPointer(start: nil, count: 0)) }

    func replyError(_ unique: UInt64, _ err: Int32) { send(unique, error: -err, UnsafeRawBufferPointer(start: nil, count: 0)) }

    func send(_ unique: UInt64, error: Int32, _ payload: UnsafeRawBufferPointer) {
        var h = fuse_out_header()
        h.len = UInt32(MemoryLayout<fuse_out_header>.size + payload.count)
        h.error = error
        h.unique = unique
        var iov = [iovec](repeating: iovec(), count: 2)
        withUnsafeMutableBytes(of: &h) { hb in
            iov[0] = iovec(iov_base: hb.baseAddress, iov_len: hb.count)
            iov[1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: payload.baseAddress), iov_len: payload.count)
            _ = writev(devFD.rawValue, iov, payload.count > 0 ? 2 : 1)
        }
    }
}
