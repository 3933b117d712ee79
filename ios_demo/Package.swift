// swift-tools-version:5.9
// EVARKit: run EVAR artifacts (`evar-export coreml`) with Core ML on iOS and macOS.
// One package, as Apple's ml-stable-diffusion: the library, a command-line bench and the tests.
// The SwiftUI demo app lives in App/ and uses this package as a local dependency (App/project.yml).

import PackageDescription

let package = Package(
    name: "EVARKit",
    platforms: [
        // iOS 17 / macOS 14 run artifacts with the KV cache as inputs/outputs (--target iOS17);
        // Core ML state and multifunction packages need iOS 18 / macOS 15, checked at run time.
        .iOS(.v17),
        .macOS(.v14),
    ],
    products: [
        .library(name: "EVARKit", targets: ["EVARKit"]),
        .executable(name: "evar-ios-bench", targets: ["evar-ios-bench"]),
    ],
    targets: [
        .target(name: "EVARKit", path: "Sources/EVARKit"),
        .executableTarget(name: "evar-ios-bench", dependencies: ["EVARKit"], path: "Sources/evar-ios-bench"),
        // The shared fixtures (Tests/Fixtures/*.json) are read from the source tree via #filePath, so the
        // Python suite and XCTest use the very same files.
        .testTarget(name: "EVARKitTests", dependencies: ["EVARKit"], path: "Tests/EVARKitTests"),
    ]
)
