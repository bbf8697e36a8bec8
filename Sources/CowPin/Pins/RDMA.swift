import CCowPin
import Glibc
import SystemPackage

/// An RDMA memory region: ibv_reg_mr() through libibverbs, the kernel's
/// ib_umem_get(), a FOLL_LONGTERM pin held for as long as the region is
/// registered. Read-only (IBV_ACCESS_REMOTE_READ only) or read-write
/// (LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ). The device's view is what a
/// real RDMA driver moves: an RDMA READ of the region by the responder of a
/// loopback reliable-connected QP pair, into a separate scratch region that
/// is never shared; for the R/W region also an RDMA WRITE into it, which the
/// process must then see.
///
/// Until 6.1 ib_umem_get() pinned every region with FOLL_WRITE, a R/O one
/// with FOLL_FORCE too (a write fault in the process's mapping at
/// registration); since 6.2 (b40656aa7d55, "RDMA/umem: remove FOLL_FORCE
/// usage") a R/O region is a R/O long-term pin.
public struct RDMAPin: PinMethod {
    public let writable: Bool
    public init(writable: Bool) { self.writable = writable }

    public var id: String { writable ? "rdma-rw" : "rdma-ro" }
    public var summary: String {
        writable
            ? "RDMA memory region, ibv_reg_mr(LOCAL_WRITE|REMOTE_WRITE|REMOTE_READ) (ib_umem_get(): a long-term R/W pin), read and written by a real RDMA driver (RDMA READ and WRITE)"
            : "RDMA memory region, ibv_reg_mr(REMOTE_READ) (ib_umem_get(): a long-term pin, FOLL_WRITE|FOLL_FORCE until 6.1, R/O since 6.2), read by a real RDMA driver (RDMA READ)"
    }
    public var readOnly: Bool { !writable }
    /// Every event, on the standard backings, swapped out, on hugetlb, and
    /// for the events mm/cow.c runs on every shape the KSM page too; the R/W
    /// region's device writes too. An RDMA transfer reads (and writes) the
    /// whole region, so the THP geometry (every mTHP size and shape) is left
    /// to the pins that are cheaper to read (io_uring, O_DIRECT, gup_test).
    public var coverage: PinCoverage {
        PinCoverage(anon: Self.backings, matrix: Self.backings + [.ksmPage], deviceWrites: writable)
    }

    static let backings: [Backing] = Backing.standard + Backing.standard.map { $0.swappedOut() }
        + [.hugetlb(2048), .hugetlb(1_048_576)]

    public var access: Int32 {
        writable ? Int32(CP_IBV_ACCESS_LOCAL_WRITE | CP_IBV_ACCESS_REMOTE_WRITE | CP_IBV_ACCESS_REMOTE_READ)
                 : Int32(CP_IBV_ACCESS_REMOTE_READ)
    }
    var accessName: String { writable ? "LOCAL_WRITE|REMOTE_WRITE|REMOTE_READ" : "REMOTE_READ" }

    public func unavailable(_ probe: Probe) -> String? {
        guard let rdma = probe.rdma else { return RDMA.missing }
        if rdma.forkStatus == RDMA.forkStatusName(Int32(CP_IBV_FORK_ENABLED)) {
            return "rdma-core's fork support is on in this process (RDMAV_FORK_SAFE or IBV_FORK_SAFE is set): every region would be MADV_DONTFORK, and the cases would test rdma-core, not the kernel"
        }
        return rdma.port == nil ? rdma.detail : nil
    }

    /// rdma-core's ibv_is_fork_initialized() beside every fork event: with
    /// IBV_FORK_UNNEEDED it says the kernel makes ibv_fork_init() unneeded.
    public func claim(about event: LongTermEvent, _ probe: Probe) -> PinClaim? {
        guard event.forks, let status = probe.rdma?.forkStatus else { return nil }
        let unneeded = status == RDMA.forkStatusName(Int32(CP_IBV_FORK_UNNEEDED))
        let meaning = unneeded ? "fork() needs no ibv_fork_init() on this kernel"
                               : "a program that fork()s needs ibv_fork_init() (MADV_DONTFORK on every region) on this kernel; cowpin does not call it"
        return PinClaim(source: "rdma-core", text: "rdma-core: ibv_is_fork_initialized() = \(status): \(meaning)", promisesCoherence: unneeded)
    }

    public func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
        guard let port = ctx.probe.rdma?.port else { throw CaseSkip(ctx.probe.rdma?.detail ?? RDMA.missing) }
        let link = try RDMALink(port, timeoutMs: ctx.timeoutMs)
        // The scratch region the responder reads into (and the R/W check
        // writes from): its own MR, MADV_DONTFORK, never shared.
        let scratch = try Region.anonymous(size: region.size, origin: "RDMA scratch region")
        try scratch.madvise(Int32(CP_MADV_DONTFORK), name: "MADV_DONTFORK")
        scratch.fill(.zero)
        var scratchMR: RDMALink.MR?
        let mr: RDMALink.MR
        do {
            scratchMR = try link.register(scratch.base, size: scratch.size, access: Int32(CP_IBV_ACCESS_LOCAL_WRITE), what: "the scratch region")
            mr = try link.register(region.base, size: region.size, access: access, what: "the case's region (\(accessName))")
        } catch {
            scratchMR?.release()
            scratch.release()
            // A R/O region is pinned FOLL_WRITE|FOLL_FORCE until 6.1, and
            // GUP refuses FOLL_FORCE|FOLL_WRITE on hugetlb (check_vma_flags()
            // in 6.1's mm/gup.c): a read-only hugetlb mapping cannot be
            // registered for remote reads there.
            if !writable, let e = error as? SyscallError, e.errno == EFAULT, region.origin.hasPrefix("hugetlb") {
                throw CaseSkip("this kernel refuses a REMOTE_READ-only memory region in a read-only hugetlb mapping (ibv_reg_mr: EFAULT): ib_umem_get() pinned R/O regions with FOLL_WRITE|FOLL_FORCE until 6.1, which GUP refuses on hugetlb; since 6.2 a R/O region is a R/O pin")
            }
            throw error
        }
        let pin = RDMARegion(link: link, mr: mr, scratch: scratch, scratchMR: scratchMR!, region: region, ctx: ctx)
        ctx.onCleanup { pin.release() }
        ctx.note("ibv_reg_mr(\(accessName)) of \(region.size) bytes on \(port.device) port \(port.port) (GID index \(port.gidIndex), \(port.gid)\(port.netdev.map { " on \($0)" } ?? "")): pinned \(RDMA.frames(region))")
        return pin
    }
}

/// Where an RDMA device is found and how cowpin talks to it.
public enum RDMA {
    public static let missing = "no RDMA device: cowpin needs an RDMA device with an active port and a RoCE v2 GID (soft-RoCE: modules rdma_rxe and ib_uverbs, a netdev up, `rdma link add rxe0 type rxe netdev IF`; scripts/vm-run sets one up)"

    /// IBV_FORK_DISABLED, IBV_FORK_ENABLED, IBV_FORK_UNNEEDED.
    static func forkStatusName(_ s: Int32) -> String {
        switch s {
        case Int32(CP_IBV_FORK_DISABLED): return "IBV_FORK_DISABLED"
        case Int32(CP_IBV_FORK_ENABLED): return "IBV_FORK_ENABLED"
        case Int32(CP_IBV_FORK_UNNEEDED): return "IBV_FORK_UNNEEDED"
        default: return "unknown (\(s))"
        }
    }

    /// What the running system offers: devices, the port cowpin would use,
    /// and rdma-core's fork claim. libibverbs is loaded only when a device
    /// exists (it adds mappings every case's fork() would copy).
    static func probe() -> Probe.RDMAInfo {
        let devices = listDirectory("/sys/class/infiniband").sorted()
        guard !devices.isEmpty else {
            var why = missing
            if let config = KernelConfig.current(keys: ["CONFIG_INFINIBAND", "CONFIG_RDMA_RXE"]) {
                if config.values["CONFIG_INFINIBAND"] == nil {
                    why = "no RDMA support in this kernel: CONFIG_INFINIBAND is not set (\(config.source))"
                } else if config.values["CONFIG_RDMA_RXE"] == nil {
                    why = "no RDMA device, and this kernel has no soft-RoCE driver (CONFIG_RDMA_RXE is not set, \(config.source)); \(missing)"
                }
            }
            return Probe.RDMAInfo(devices: [], port: nil, detail: why, forkStatus: nil)
        }
        var why = [CChar](repeating: 0, count: 512)
        let loaded = cp_rdma_load(&why, why.count)
        let fork = loaded == 0 ? forkStatusName(cp_rdma_fork_status()) : nil
        if loaded != 0 {
            return Probe.RDMAInfo(devices: devices, port: nil, detail: String(cString: why), forkStatus: nil)
        }
        if access("/dev/infiniband", F_OK) != 0 || !listDirectory("/dev/infiniband").contains(where: { $0.hasPrefix("uverbs") }) {
            return Probe.RDMAInfo(devices: devices, port: nil, detail: "RDMA devices \(devices.joined(separator: ", ")) but no /dev/infiniband/uverbs* (module ib_uverbs not loaded)", forkStatus: fork)
        }
        var seen: [String] = []
        for dev in devices {
            for p in listDirectory("/sys/class/infiniband/\(dev)/ports").compactMap({ UInt8($0) }).sorted() {
                let dir = "/sys/class/infiniband/\(dev)/ports/\(p)"
                let state = readFile("\(dir)/state")?.trimmed ?? "?"
                guard state.hasSuffix("ACTIVE") else {
                    seen.append("\(dev) port \(p) is \(state)")
                    continue
                }
                guard let gid = roceV2GID(dir) else {
                    seen.append("\(dev) port \(p) has no RoCE v2 GID (no IP address on its netdev?)")
                    continue
                }
                let port = Probe.RDMAPort(device: dev, port: p, gidIndex: gid.index, gid: gid.gid, netdev: gid.netdev)
                return Probe.RDMAInfo(devices: devices, port: port, detail: "\(dev) port \(p), GID index \(gid.index) (\(gid.gid), RoCE v2\(gid.netdev.map { " on \($0)" } ?? ""))", forkStatus: fork)
            }
        }
        return Probe.RDMAInfo(devices: devices, port: nil, detail: "no usable RDMA port: \(seen.joined(separator: "; "))", forkStatus: fork)
    }

    /// The first non-zero RoCE v2 GID of a port (sysfs gids/N, gid_attrs/types/N).
    static func roceV2GID(_ dir: String) -> (index: Int, gid: String, netdev: String?)? {
        for name in listDirectory("\(dir)/gids").sorted(by: { (Int($0) ?? 0) < (Int($1) ?? 0) }) {
            guard let i = Int(name), let gid = readFile("\(dir)/gids/\(name)")?.trimmed,
                  gid.contains(where: { $0 != "0" && $0 != ":" }),
                  readFile("\(dir)/gid_attrs/types/\(name)")?.trimmed == "RoCE v2" else { continue }
            return (i, gid, readFile("\(dir)/gid_attrs/ndevs/\(name)")?.trimmed)
        }
        return nil
    }

    /// "page 0 pfn 0x1234, page 511 pfn 0x1433": the frames the process maps
    /// at the region's first and last page now (no PFNs without root).
    static func frames(_ region: Region) -> String {
        let last = region.pages - 1
        return (last > 0 ? [0, last] : [0]).map { page -> String in
            let e = PageInfo.entry(address: region.address(ofPage: page))
            let where_ = e?.pfn.map { "pfn 0x\(String($0, radix: 16))" } ?? (e?.swapped == true ? "in swap" : e?.present == true ? "pfn unreadable" : "not mapped")
            return "page \(page) \(where_)"
        }.joined(separator: ", ")
    }
}

extension Probe {
    /// RDMA: the devices, the port cowpin uses, rdma-core's fork claim.
    public struct RDMAInfo: Codable, Sendable, Equatable {
        public var devices: [String]
        /// The port the RDMA cases use, or nil (`detail` says why).
        public var port: RDMAPort?
        public var detail: String
        /// rdma-core's ibv_is_fork_initialized() (IBV_FORK_UNNEEDED, ...), when libibverbs loads.
        public var forkStatus: String?
    }

    public struct RDMAPort: Codable, Sendable, Equatable {
        public var device: String
        public var port: UInt8
        public var gidIndex: Int
        public var gid: String
        public var netdev: String?
    }
}

/// A device context, protection domain, CQ and the loopback RC QP pair.
final class RDMALink {
    let handle: OpaquePointer
    let timeoutMs: Int32

    /// A registered memory region.
    final class MR {
        let handle: UnsafeMutableRawPointer
        let address: UnsafeMutableRawPointer
        let size: Int
        let lkey: UInt32
        let rkey: UInt32
        var registered = true
        init(handle: UnsafeMutableRawPointer, address: UnsafeMutableRawPointer, size: Int, lkey: UInt32, rkey: UInt32) {
            self.handle = handle
            self.address = address
            self.size = size
            self.lkey = lkey
            self.rkey = rkey
        }

        func release() {
            if registered {
                cp_rdma_dereg_mr(handle)
                registered = false
            }
        }
    }

    init(_ port: Probe.RDMAPort, timeoutMs: Int32) throws {
        var why = [CChar](repeating: 0, count: 512)
        var h: OpaquePointer?
        let r = cp_rdma_open(port.device, port.port, Int32(port.gidIndex), &h, &why, why.count)
        guard r == 0, let h else { throw HarnessError("RDMA setup on \(port.device): \(String(cString: why)) (\(Errno.name(-r)))") }
        handle = h
        self.timeoutMs = timeoutMs
    }

    deinit { cp_rdma_close(handle) }

    /// ibv_reg_mr(): the kernel pins the pages.
    func register(_ address: UnsafeMutableRawPointer, size: Int, access: Int32, what: String) throws -> MR {
        var mr: UnsafeMutableRawPointer?
        var lkey: UInt32 = 0, rkey: UInt32 = 0
        let r = cp_rdma_reg_mr(handle, address, size, access, &mr, &lkey, &rkey)
        if r == -ENOMEM && !Probe.isRoot, let soft = Probe.memlockLimit().soft, soft < UInt64(size) {
            throw CaseSkip("RLIMIT_MEMLOCK (\(soft) bytes) is below the \(size)-byte memory region to register")
        }
        guard r == 0, let mr else { throw SyscallError("ibv_reg_mr(\(what), \(size) bytes)", result: Int(r)) }
        return MR(handle: mr, address: address, size: size, lkey: lkey, rkey: rkey)
    }

    /// RDMA READ (the responder reads `count` bytes of `remote` into `local`)
    /// or RDMA WRITE (it writes `local` into `remote`); the bytes moved.
    func transfer(write: Bool, local: MR, remote: MR, count: Int) throws -> Int {
        var why = [CChar](repeating: 0, count: 512)
        var moved: UInt32 = 0
        let r = cp_rdma_transfer(handle, write ? 1 : 0, local.address, local.lkey, UInt64(UInt(bitPattern: remote.address)),
                                 remote.rkey, UInt32(count), timeoutMs, &moved, &why, why.count)
        guard r == 0 else { throw HarnessError(String(cString: why)) }
        return Int(moved)
    }
}

/// The registered region, seen by the RDMA driver.
final class RDMARegion: Pin {
    let link: RDMALink
    let mr: RDMALink.MR
    let scratch: Region
    let scratchMR: RDMALink.MR
    let region: Region
    let ctx: CaseContext

    init(link: RDMALink, mr: RDMALink.MR, scratch: Region, scratchMR: RDMALink.MR, region: Region, ctx: CaseContext) {
        self.link = link
        self.mr = mr
        self.scratch = scratch
        self.scratchMR = scratchMR
        self.region = region
        self.ctx = ctx
    }

    var view: String { "device (RDMA READ of the memory region by the responder, into a separate scratch region)" }
    var observed: Range<Int> { 0..<mr.size }

    /// What the scratch region holds before each transfer: if it is still
    /// there afterwards, the transfer moved nothing (a harness failure).
    static let marker = Content.written(0x5A, by: "the scratch marker")

    /// RDMA READ of the whole region into the scratch region.
    func read() throws -> UnsafeRawBufferPointer {
        scratch.fill(Self.marker)
        let n = try link.transfer(write: false, local: scratchMR, remote: mr, count: mr.size)
        guard n == mr.size else { throw HarnessError("the RDMA READ moved \(n) of \(mr.size) bytes") }
        let seen = UnsafeRawBufferPointer(rebasing: scratch.bytes[0..<n])
        if Self.marker.matches(seen, offset: 0) {
            throw HarnessError("the RDMA READ completed but copied nothing into the scratch region")
        }
        return seen
    }

    func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let seen = try read()
        ctx.note("RDMA READ: the responder read \(seen.count) bytes of the region; the process maps \(RDMA.frames(region))")
        return try body(seen)
    }

    /// RDMA WRITE of `content` into the region, then an RDMA READ that
    /// must find it in the pinned pages (else the WRITE moved nothing).
    func deviceWrite(_ content: Content) throws {
        scratch.fill(content)
        let n = try link.transfer(write: true, local: scratchMR, remote: mr, count: mr.size)
        let back = try read()
        guard content.matches(back, offset: 0) else {
            throw HarnessError("the RDMA WRITE of \(n) bytes completed, but an RDMA READ of the region does not find them")
        }
        ctx.note("RDMA WRITE: the responder wrote \(n) bytes (\(content.label)) into the region; the process maps \(RDMA.frames(region))")
    }

    func release() {
        mr.release()
        scratchMR.release()
        scratch.release()
    }
}
