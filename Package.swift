// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "cowpin",
    products: [
        .executable(name: "cowpin", targets: ["cowpin"]),
        .library(name: "CowPin", targets: ["CowPin"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // FileDescriptor, Errno and FilePath: descriptors the Swift side owns.
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // liburing, found through pkg-config (Debian/Ubuntu: liburing-dev).
        .systemLibrary(
            name: "CLiburing",
            path: "CShims/CLiburing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        // zlib, for /proc/config.gz (Debian/Ubuntu: zlib1g-dev).
        .systemLibrary(
            name: "CZlib",
            path: "CShims/CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // Thin, typed C over the syscalls, and every line that runs in a child after fork().
        .target(
            name: "CCowPin",
            dependencies: ["CLiburing"],
            path: "CShims/CCowPin",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .target(
            name: "CowPin",
            dependencies: ["CCowPin", "CZlib", .product(name: "SystemPackage", package: "swift-system")],
            path: "Sources/CowPin"
        ),
        .executableTarget(
            name: "cowpin",
            dependencies: [
                "CowPin",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/cowpin",
            // Every case fork()s this process, so its mappings are copied per case.
            // -static-stdlib links the Swift runtime, Foundation Essentials and
            // dispatch into the executable (98 -> ~50 VMAs, fewer relocated data
            // pages); -z now binds every symbol at start, so the children do not
            // resolve their libc calls lazily (each one a symbol lookup and a
            // copy-on-write fault on the GOT).
            // Release builds only: a debug link of the static Foundation misses
            // its _FoundationCollections dependency.
            swiftSettings: [.unsafeFlags(["-static-stdlib"], .when(configuration: .release))],
            linkerSettings: [.unsafeFlags(["-static-stdlib", "-Xlinker", "-z", "-Xlinker", "now"], .when(configuration: .release))]
        ),
        .testTarget(
            name: "CowPinTests",
            dependencies: ["CowPin", "CCowPin"],
            path: "Tests/CowPinTests"
        ),
    ],
    swiftLanguageModes: [.v5]
)
