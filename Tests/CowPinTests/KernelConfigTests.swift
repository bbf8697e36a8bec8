import Foundation
import Testing

/// scripts/kernel.config, the configuration fragment scripts/kernel-build
/// merges into x86_64_defconfig, and the README section that says what a
/// kernel needs for cowpin: whatever the README names, the fragment builds in.
struct KernelConfigTests {
    // The tests run from the package directory.
    static func read(_ path: String) throws -> String {
        try String(contentsOfFile: FileManager.default.currentDirectoryPath + "/" + path, encoding: .utf8)
    }

    /// The fragment's lines that are neither blank nor comments.
    static var settings: [Substring] {
        get throws {
            try read("scripts/kernel.config").split(separator: "\n")
                .map { $0.trimmingCharacters(in: .whitespaces)[...] }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        }
    }

    /// The README's "Kernel configuration cowpin needs", up to the next
    /// heading of level 2 or 3 (a code block's `# comment` does not end it).
    static var readmeSection: Substring {
        get throws {
            let readme = try read("README.md")
            let heading = "### Kernel configuration cowpin needs\n"
            let start = try #require(readme.range(of: heading), "README.md has no section \"\(heading.dropLast())\"")
            let rest = readme[start.upperBound...]
            let end = rest.range(of: "\n##")?.lowerBound ?? rest.endIndex
            return rest[..<end]
        }
    }

    @Test("the fragment is in kselftest's form: one CONFIG_X=y a line (all built in), each option once")
    func fragmentForm() throws {
        let lines = try Self.settings
        #expect(lines.count >= 20)
        var seen = Set<Substring>()
        for line in lines {
            #expect(line.wholeMatch(of: #/CONFIG_[A-Z0-9_]+=y/#) != nil, "not a CONFIG_X=y line: \(line)")
            let name = line.prefix { $0 != "=" }
            #expect(seen.insert(name).inserted, "\(name) is set twice")
        }
    }

    @Test("every option the README's kernel configuration section names is built in by scripts/kernel.config")
    func readmeOptionsAreInTheFragment() throws {
        let section = try Self.readmeSection
        let named = Set(section.matches(of: #/CONFIG_[A-Z0-9_]+/#).map { String($0.output) })
        // The section lists what the VM and the cases need: an empty match means the text moved.
        #expect(named.count >= 20, "the README section names only \(named.sorted())")
        let settings = Set(try Self.settings.map(String.init))
        let missing = named.sorted().filter { !settings.contains($0 + "=y") }
        #expect(missing.isEmpty, "the README names \(missing.joined(separator: ", ")), which scripts/kernel.config does not set to y")
    }
}
