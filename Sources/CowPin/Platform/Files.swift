import Glibc

/// The whole content of a (proc, sys) file, as bytes, or nil.
public func readBytes(_ path: String) -> [UInt8]? {
    try? readBytes(path, limit: Int.max)
}

/// A file's content up to `limit` bytes; a longer file (or an endless one
/// like /dev/zero) is `InputTooLarge`, nil when it cannot be opened or read.
public func readBytes(_ path: String, limit: Int) throws -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var data = [UInt8]()
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        if n == 0 { break }
        guard data.count + n <= limit else { throw InputTooLarge(path: path, limit: limit) }
        data += chunk[0..<n]
    }
    return data
}

/// An input file over the size its reader accepts.
public struct InputTooLarge: Error, CustomStringConvertible {
    public var path: String
    public var limit: Int
    public var description: String { "\(path) is larger than \(limit / (1 << 20)) MiB: not an input cowpin reads" }
}

/// The whole content of a (proc, sys) file, or nil.
public func readFile(_ path: String) -> String? {
    readBytes(path).map { String(decoding: $0, as: UTF8.self) }
}

/// Writes `value` to a (sys) file; nil on success, else the errno.
@discardableResult
public func writeFile(_ path: String, _ value: String) -> Int32? {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return errno }
    defer { close(fd) }
    let bytes = Array(value.utf8)
    let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    return n == bytes.count ? nil : errno
}

/// The names in a directory but `.` and `..`; empty when it cannot be read.
func listDirectory(_ path: String) -> [String] {
    guard let d = opendir(path) else { return [] }
    defer { closedir(d) }
    var names: [String] = []
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}
