import ArgumentParser
import CowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@main
struct CowPinCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cowpin",
        abstract: "Reproduce COW / GUP-pin decoherence on the running Linux kernel.",
        discussion: """
            Exit status of `run`: 0 no decoherence, 1 decoherence found, 3 the kernel reported a WARN, BUG, \
            oops, lockup, stall or hung task during a case (kernel-warning), 2 usage or harness error, \
            4 every selected case skipped.
            """,
        version: Catalog.version,
        subcommands: [Run.self, List.self, Probe.self, Explain.self, MatrixCommand.self, Worker.self],
        defaultSubcommand: Run.self
    )

    /// ArgumentParser exits with 64 on bad input; cowpin promises 2.
    static func main() {
        // A word that is not a subcommand would be taken as `run`'s argument
        // ("Unexpected argument" with run's usage): say what it is instead.
        let args = Array(CommandLine.arguments.dropFirst())
        let all = configuration.subcommands.compactMap { $0.configuration.commandName } + ["help"]
        let commands = all.filter { $0 != Worker.configuration.commandName }
        if let word = args.first, !word.hasPrefix("-"), !all.contains(word) {
            let near = Suggest.nearest(word, among: commands)
            fputs("cowpin: unknown command '\(word)'\(near.map { "; did you mean '\($0)'?" } ?? "") (commands: \(commands.joined(separator: ", ")))\n", stderr)
            Glibc.exit(2)
        }
        do {
            var command = try parseAsRoot()
            do {
                try command.run()
            } catch let e as ValidationError {
                // Found while running (an empty selection, a file that does
                // not parse): the message alone, the arguments were well formed.
                fputs("cowpin: \(e.message)\n", stderr)
                Glibc.exit(2)
            }
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                let message = fullMessage(for: error)
                if !message.isEmpty { print(message) }
                Glibc.exit(0)
            }
            if let e = error as? ExitCode { Glibc.exit(e.rawValue) }
            fputs("cowpin: \(fullMessage(for: error))\n", stderr)
            Glibc.exit(2)
        }
    }
}

/// Shell completion (`cowpin --generate-completion-script bash|zsh|fish`) of case ids and tags.
enum Completions {
    static let caseIDs = CompletionKind.custom { _, _, prefix in Catalog.all.map(\.id).filter { $0.hasPrefix(prefix) } }
    static let tags = CompletionKind.custom { _, _, prefix in Set(Catalog.all.flatMap(\.tags)).sorted().filter { $0.hasPrefix(prefix) } }
}

struct SelectionOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Run cases whose id matches this glob (repeatable; `*` matches `/` too).", valueName: "glob"),
            completion: Completions.caseIDs)
    var filter: [String] = []

    @Option(name: .long, help: ArgumentHelp("Run cases that carry this tag (repeatable: all must match).", valueName: "tag"),
            completion: Completions.tags)
    var tag: [String] = []

    @Option(name: .long, help: ArgumentHelp("Leave out cases whose id matches this glob (repeatable).", valueName: "glob"),
            completion: Completions.caseIDs)
    var exclude: [String] = []

    @Flag(name: .long, help: "Include the cases tagged slow (1 GiB pages, about a second each), which are left out unless asked for (--slow or --tag slow).")
    var slow = false

    func cases() throws -> [Case] {
        do {
            return try Selection(filters: filter, tags: tag, excludes: exclude, includeSlow: slow).select()
        } catch let e as Selection.Unmatched {
            throw ValidationError(e.description)
        }
    }
}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case ktap, json, text
}

/// `run`'s formats: KTAP and JSON Lines stream; JSON is one document at the end.
enum RunFormat: String, ExpressibleByArgument, CaseIterable {
    case ktap, json, jsonl
}
