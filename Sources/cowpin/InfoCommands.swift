import ArgumentParser
import CowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the catalog (or the selected cases).")

    @OptionGroup var selection: SelectionOptions

    @Option(help: ArgumentHelp("Output format: text or json.", valueName: "format"))
    var format: OutputFormat = .text

    @Flag(help: "Also print each case's summary and tags.")
    var verbose = false

    func validate() throws {
        guard format != .ktap else { throw ValidationError("list supports --format text or json") }
    }

    struct Entry: Codable {
        var id: String
        var summary: String
        var tags: [String]
    }

    func run() throws {
        let cases = try selection.cases()
        if format == .json {
            print(JSONReporter.encode(cases.map { Entry(id: $0.id, summary: $0.summary, tags: $0.tags) }))
            return
        }
        for c in cases {
            print(c.id)
            if verbose {
                print("    \(c.summary)")
                print("    tags: \(c.tags.joined(separator: ", "))")
            }
        }
    }
}

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "probe", abstract: "Show what the running kernel offers cowpin.")

    @Option(help: ArgumentHelp("Output format: text or json.", valueName: "format"))
    var format: OutputFormat = .text

    func validate() throws {
        guard format != .ktap else { throw ValidationError("probe supports --format text or json") }
    }

    func run() throws {
        let p = CowPin.Probe.current()
        if format == .json {
            print(JSONReporter.encode(p))
        } else {
            print(ProbeText.render(p))
        }
    }
}

struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "explain", abstract: "Explain what a case does, step by step.")

    @Argument(help: "A case id (see `cowpin list`).", completion: Completions.caseIDs)
    var caseID: String

    @Option(help: ArgumentHelp("The expected-verdict file (upstream history; default: the data/expected-verdicts.json built into cowpin).", valueName: "path"))
    var expected: String?

    @Option(help: ArgumentHelp("Say what history expects on this kernel release (default: the running kernel's).", valueName: "release"))
    var release: String?

    func run() throws {
        guard let c = Catalog.find(caseID) else {
            throw ValidationError("unknown case '\(caseID)' (see `cowpin list`)")
        }
        print(c.id)
        print("  \(c.summary)")
        print("  tags: \(c.tags.joined(separator: ", "))")
        print("  steps:")
        print("    0. map \(c.backing.summary) and fill it with the case's own pattern")
        for (i, s) in c.scenario.steps.enumerated() { print("    \(i + 1). \(s)") }
        print("  verdicts: coherent = every view holds what it should; decoherent = a view holds another actor's data")
        print("  (the evidence names the view, the byte ranges, and whose data is there); skip = cannot run here, with the reason;")
        print("  error = the harness failed, not a finding about the kernel.")
        if let k = c.scenario.knownIssue { print("  known unfixed upstream: \(k.reason) [\(k.reference)]") }
        let history: ExpectedVerdicts
        do { history = try ExpectedVerdicts.load(path: expected) } catch {
            print("  upstream history: unavailable (\(error))")
            return
        }
        if let f = history.family(of: c.id) {
            print("  upstream history (\(f.cases)): \(f.history)")
            var verdict = f.initially ?? .coherent
            var line = "\(verdict.rawValue) on 5.4"
            let steps = (f.steps ?? []).compactMap { s in history.changes[s.change].map { (s, $0) } }
                .sorted { (KernelVersion($0.1.release) ?? KernelVersion("0.0")!) < (KernelVersion($1.1.release) ?? KernelVersion("0.0")!) }
            for (s, ch) in steps {
                if let b = s.becomes {
                    verdict = b
                    line += "; \(verdict.rawValue) since \(ch.release)"
                } else {
                    line += "; unknown since \(ch.release) (\(s.unknown ?? ""))"
                }
            }
            print("  timeline: \(line)")
            for (_, ch) in steps { print("  change: \(ch.citation): \(ch.mechanism)") }
            if let u = f.unknownBefore { print("  unknown before \(u): \(f.unknownWhy ?? "check the kernel")") }
            let release = self.release ?? CowPin.Probe.current().kernel.release
            switch history.expectation(c.id, release: release) {
            case .verdict(let k, let because)?: print("  expected on \(release): \(k.rawValue) (\(because))")
            case .unknown(let why)?: print("  expected on \(release): unknown (\(why))")
            case nil: break
            }
            for (kernel, seen) in (f.observed ?? [:]).sorted(by: { $0.key < $1.key }) { print("  measured on \(kernel): \(seen)") }
        }
        if let p = history.policy(of: c.id) {
            print("  policy (\(p.cases)): \(p.history)")
            let release = self.release ?? CowPin.Probe.current().kernel.release
            if let (allowance, because) = history.expectedPolicy(c.id, release: release) {
                print("  upstream's rule on \(release): the pin \(allowance) (\(because))")
            }
        }
    }
}
