import CZlib
import Glibc
import SystemPackage

/// The whole content of a (proc, sys) file, as bytes, or nil.
public func readBytes(_ path: String) -> [UInt8]? {
    try? readBytes(path, limit: Int.max)
}

/// A file's content up to `limit` bytes; a longer file (or an endless one
/// like /dev/zero) is `InputTooLarge`, nil when it cannot be opened or read.
public func readBytes(_ path: String, limit: Int) throws -> [UInt8]? {
    guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: .closeOnExec) else { return nil }
    defer { try? fd.close() }
    var data = [UInt8]()
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }) else { return nil }
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
    do {
        let fd = try FileDescriptor.open(FilePath(path), .writeOnly, options: .closeOnExec)
        return try fd.closeAfter {
            let bytes = Array(value.utf8)
            let n = try bytes.withUnsafeBytes { try fd.write($0) }
            return n == bytes.count ? nil : EIO
        }
    } catch {
        return (error as? Errno)?.rawValue ?? EIO
    }
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

/// The decompressed content of a gzip file, at most `limit` bytes; nil when it cannot be opened or read.
public func readGzip(_ path: String, limit: Int) -> [UInt8]? {
    guard let f = gzopen(path, "rb") else { return nil }
    defer { gzclose(f) }
    var data = [UInt8](repeating: 0, count: limit)
    var done = 0
    while done < limit {
        let n = data.withUnsafeMutableBytes { gzread(f, $0.baseAddress! + done, UInt32(Swift.min(limit - done, 1 << 30))) }
        if n < 0 { return nil }
        if n == 0 { break }
        done += Int(n)
    }
    data.removeSubrange(done...)
    return data
}
