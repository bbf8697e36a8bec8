import CCowPin
import Glibc
import SystemPackage

/// A DMA-capable PCI device driven from user space through VFIO. Each driver
/// knows one device's registers; cowpin only needs a copy from one IOVA to
/// another through the device, to see what the device reads.
public protocol DMADevice: AnyObject {
    static var pciID: (vendor: UInt16, device: UInt16) { get }
    static var name: String { get }
    init(vfio: VFIODevice) throws
    /// Largest transfer, in bytes.
    var maxTransfer: Int { get }
    /// IOVAs must stay below this.
    var iovaLimit: UInt64 { get }
    /// The device reads `count` bytes at IOVA `source` and writes them to IOVA `destination`.
    func copy(from source: UInt64, to destination: UInt64, count: Int, timeoutMs: Int32) throws
}

/// The DMA devices cowpin knows, by PCI id.
public enum DMADevices {
    public static let drivers: [DMADevice.Type] = [EduDevice.self]

    /// A device bound to vfio-pci that one of the drivers knows, or the reason there is none.
    public static func find() -> (bdf: String, driver: DMADevice.Type)? {
        for bdf in listDirectory("/sys/bus/pci/drivers/vfio-pci").filter({ $0.contains(":") }).sorted() {
            let dir = "/sys/bus/pci/devices/\(bdf)"
            guard let v = readFile("\(dir)/vendor").flatMap({ UInt16($0.trimmed.dropFirst(2), radix: 16) }),
                  let d = readFile("\(dir)/device").flatMap({ UInt16($0.trimmed.dropFirst(2), radix: 16) }) else { continue }
            if let driver = drivers.first(where: { $0.pciID == (v, d) }) { return (bdf, driver) }
        }
        return nil
    }

    public static let missing = "no VFIO device with a DMA engine bound to vfio-pci (known: QEMU edu 1234:11e8; scripts/vm-run provides one)"
}

/// A VFIO container, group and device (type1 IOMMU).
public final class VFIODevice {
    public let bdf: String
    let containerFD: FileDescriptor
    let groupFD: FileDescriptor
    let deviceFD: FileDescriptor
    var container: Int32 { containerFD.rawValue }
    var device: Int32 { deviceFD.rawValue }
    let bar0: UInt64
    let config: UInt64

    public init(bdf: String) throws {
        self.bdf = bdf
        guard let groupLink = realpath("/sys/bus/pci/devices/\(bdf)/iommu_group", nil) else {
            throw CaseSkip("\(bdf) has no IOMMU group (no IOMMU enabled?)")
        }
        let groupNumber = String(cString: groupLink).split(separator: "/").last.map(String.init) ?? "?"
        free(groupLink)
        let c = cp_vfio_open_container()
        guard c >= 0 else { throw SyscallError("open(/dev/vfio/vfio)", result: Int(c)) }
        containerFD = FileDescriptor(rawValue: c)
        let g = cp_vfio_open_group(c, "/dev/vfio/\(groupNumber)")
        guard g >= 0 else {
            try? containerFD.close()
            throw SyscallError("VFIO group /dev/vfio/\(groupNumber)", result: Int(g))
        }
        groupFD = FileDescriptor(rawValue: g)
        let d = cp_vfio_device_fd(g, bdf)
        guard d >= 0 else {
            try? groupFD.close()
            try? containerFD.close()
            throw SyscallError("VFIO_GROUP_GET_DEVICE_FD(\(bdf))", result: Int(d))
        }
        deviceFD = FileDescriptor(rawValue: d)
        var off: UInt64 = 0, size: UInt64 = 0, coff: UInt64 = 0
        try check("VFIO region BAR0", cp_vfio_region(d, UInt32(CP_VFIO_BAR0), &off, &size))
        bar0 = off
        try check("VFIO config region", cp_vfio_region(d, UInt32(CP_VFIO_CONFIG), &coff, &size))
        config = coff
    }

    deinit {
        try? deviceFD.close()
        try? groupFD.close()
        try? containerFD.close()
    }

    public func read32(_ reg: UInt64) throws -> UInt32 {
        var v: UInt32 = 0
        guard cp_pread_full(device, &v, 4, Int64(bar0 + reg)) == 4 else { throw SyscallError("read BAR0+\(reg)", errno: errno) }
        return v
    }

    public func read64(_ reg: UInt64) throws -> UInt64 {
        var v: UInt64 = 0
        guard cp_pread_full(device, &v, 8, Int64(bar0 + reg)) == 8 else { throw SyscallError("read BAR0+\(reg)", errno: errno) }
        return v
    }

    public func write64(_ reg: UInt64, _ value: UInt64) throws {
        var v = value
        guard cp_pwrite_full(device, &v, 8, Int64(bar0 + reg)) == 8 else { throw SyscallError("write BAR0+\(reg)", errno: errno) }
    }

    /// vfio-pci leaves bus mastering off; without it a DMA copies nothing.
    public func enableBusMaster() throws {
        var cmd: UInt16 = 0
        guard cp_pread_full(device, &cmd, 2, Int64(config + 4)) == 2 else { throw SyscallError("read PCI_COMMAND", errno: errno) }
        cmd |= 0x4
        guard cp_pwrite_full(device, &cmd, 2, Int64(config + 4)) == 2 else { throw SyscallError("write PCI_COMMAND", errno: errno) }
    }

    /// VFIO_IOMMU_MAP_DMA: the long-term pin (R/O unless `writable`).
    public func map(_ address: UnsafeMutableRawPointer, iova: UInt64, size: Int, writable: Bool) throws {
        try check("VFIO_IOMMU_MAP_DMA(\(writable ? "read|write" : "read"), \(size) bytes)",
                  cp_vfio_map_dma(container, address, iova, UInt64(size), writable ? 1 : 0))
    }

    public func unmap(iova: UInt64, size: Int) {
        cp_vfio_unmap_dma(container, iova, UInt64(size))
    }
}

/// QEMU's `edu` device: a 4 KiB buffer at device address 0x40000 and a DMA
/// engine that copies between it and RAM (registers at BAR0 0x80..0x98).
public final class EduDevice: DMADevice {
    public static let pciID: (vendor: UInt16, device: UInt16) = (0x1234, 0x11e8)
    public static let name = "QEMU edu"
    let vfio: VFIODevice
    static let buffer: UInt64 = 0x40000

    public required init(vfio: VFIODevice) throws {
        self.vfio = vfio
        let ident = try vfio.read32(0)
        guard ident & 0xff == 0xed else { throw HarnessError("edu: unexpected identification 0x\(String(ident, radix: 16))") }
        try vfio.enableBusMaster()
    }

    /// One byte less than the buffer: QEMU 7.2 aborts on a transfer ending exactly at its end.
    public var maxTransfer: Int { 4095 }
    public var iovaLimit: UInt64 { 1 << 28 }

    public func copy(from source: UInt64, to destination: UInt64, count: Int, timeoutMs: Int32) throws {
        try dma(source, Self.buffer, count, toRAM: false, timeoutMs)
        try dma(Self.buffer, destination, count, toRAM: true, timeoutMs)
    }

    func dma(_ src: UInt64, _ dst: UInt64, _ count: Int, toRAM: Bool, _ timeoutMs: Int32) throws {
        try vfio.write64(0x80, src)
        try vfio.write64(0x88, dst)
        try vfio.write64(0x90, UInt64(count))
        try vfio.write64(0x98, 1 | (toRAM ? 2 : 0))
        let deadline = monotonicNs() + UInt64(timeoutMs) * 1_000_000
        while try vfio.read64(0x98) & 1 != 0 {
            if monotonicNs() > deadline { throw HarnessError("edu DMA did not finish within \(timeoutMs) ms") }
            var ts = timespec(tv_sec: 0, tv_nsec: 2_000_000)
            nanosleep(&ts, nil)
        }
    }
}

/// VFIO_IOMMU_MAP_DMA of the region, read-only or read-write. The device's
/// view is read with a DMA round trip: pinned buffer -> device -> a separate
/// scratch page (MADV_DONTFORK, never shared), compared with what the process sees.
public struct VFIOPin: PinMethod {
    public let writable: Bool
    public init(writable: Bool) { self.writable = writable }

    public var id: String { writable ? "vfio-rw" : "vfio-ro" }
    public var summary: String {
        "VFIO_IOMMU_MAP_DMA \(writable ? "read-write" : "read-only") (a device's long-term pin), seen by a real DMA engine"
    }
    public var readOnly: Bool { !writable }
    /// One process at a time may open a VFIO group (EBUSY otherwise).
    public var needs: SharedNeeds { .alone }
    /// A DMA round trip per read (about 100 ms): every event, on the standard backings.
    public var coverage: PinCoverage { PinCoverage(anon: Backing.standard, matrix: Backing.standard) }

    public func unavailable(_ probe: Probe) -> String? {
        if !probe.vfio.container { return "no /dev/vfio/vfio (VFIO not enabled); \(DMADevices.missing)" }
        return probe.vfio.dmaDevice == nil ? DMADevices.missing : nil
    }

    public func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
        guard let (bdf, driver) = DMADevices.find() else { throw CaseSkip(DMADevices.missing) }
        let vfio = try VFIODevice(bdf: bdf)
        let device = try driver.init(vfio: vfio)
        let scratch = try Region.anonymous(size: region.pageSize, origin: "DMA scratch page")
        try scratch.madvise(Int32(CP_MADV_DONTFORK), name: "MADV_DONTFORK")
        scratch.fill(.zero)
        // IOVAs aligned to the region's size (a THP maps as one huge IOMMU page).
        let scratchIOVA: UInt64 = 0x1000
        let iova = UInt64(max(region.size, 1 << 20))
        guard iova + UInt64(region.size) <= device.iovaLimit else { throw CaseSkip("\(driver.name) cannot address a \(region.size)-byte buffer") }
        try vfio.map(scratch.base, iova: scratchIOVA, size: scratch.size, writable: true)
        do {
            try vfio.map(region.base, iova: iova, size: region.size, writable: writable)
        } catch {
            vfio.unmap(iova: scratchIOVA, size: scratch.size)
            throw error
        }
        let pin = VFIOMapping(vfio: vfio, device: device, iova: iova, size: region.size,
                              scratch: scratch, scratchIOVA: scratchIOVA, name: driver.name, timeoutMs: ctx.timeoutMs)
        ctx.onCleanup { pin.release() }
        return pin
    }
}

final class VFIOMapping: Pin {
    let vfio: VFIODevice
    let device: DMADevice
    let iova: UInt64
    let size: Int
    let scratch: Region
    let scratchIOVA: UInt64
    let name: String
    let timeoutMs: Int32
    var mapped = true

    init(vfio: VFIODevice, device: DMADevice, iova: UInt64, size: Int, scratch: Region, scratchIOVA: UInt64, name: String, timeoutMs: Int32) {
        self.vfio = vfio
        self.device = device
        self.iova = iova
        self.size = size
        self.scratch = scratch
        self.scratchIOVA = scratchIOVA
        self.name = name
        self.timeoutMs = timeoutMs
    }

    var view: String { "device (\(name) DMA from the mapped buffer, via a scratch page)" }
    var observed: Range<Int> { 0..<min(size, device.maxTransfer) }

    /// What the scratch page holds before each round trip: if it is still
    /// there afterwards, the device copied nothing (a harness failure, not a view).
    static let marker = Content.written(0x5A, by: "the scratch marker")

    func withView<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let n = observed.count
        scratch.fill(Self.marker)
        try device.copy(from: iova, to: scratchIOVA, count: n, timeoutMs: timeoutMs)
        let seen = UnsafeRawBufferPointer(rebasing: scratch.bytes[0..<n])
        if Self.marker.matches(seen, offset: 0) {
            throw HarnessError("the \(name) DMA round trip copied nothing (bus mastering off, or IOMMU fault)")
        }
        return try body(seen)
    }

    func release() {
        if mapped {
            vfio.unmap(iova: iova, size: size)
            vfio.unmap(iova: scratchIOVA, size: scratch.size)
            mapped = false
        }
    }
}
