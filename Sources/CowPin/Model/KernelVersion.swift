/// major.minor[.patch] of a kernel release string ("6.1.0-56-amd64", "6.18.44-foo").
public struct KernelVersion: Comparable, Sendable, CustomStringConvertible {
    public var parts: [Int]
    public init?(_ release: String) {
        let head = release.prefix { $0.isNumber || $0 == "." }
        let p = head.split(separator: ".").compactMap { Int($0) }
        guard p.count >= 2 else { return nil }
        parts = Array(p.prefix(3))
    }
    /// 6.2 == 6.2.0.
    public static func == (a: KernelVersion, b: KernelVersion) -> Bool { !(a < b) && !(b < a) }
    public static func < (a: KernelVersion, b: KernelVersion) -> Bool {
        for i in 0..<max(a.parts.count, b.parts.count) {
            let x = i < a.parts.count ? a.parts[i] : 0, y = i < b.parts.count ? b.parts[i] : 0
            if x != y { return x < y }
        }
        return false
    }
    public var description: String { parts.map(String.init).joined(separator: ".") }
}
