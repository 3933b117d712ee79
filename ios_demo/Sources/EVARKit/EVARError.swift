// Every failure a user can cause names the thing that is wrong, as in the Python toolchain.

import Foundation

/// Errors from loading and running EVAR artifacts.
public enum EVARError: Error, LocalizedError, Equatable {
    /// The artifact directory or a file the manifest lists is missing.
    case missingFile(String)
    /// The manifest cannot be decoded or contradicts itself.
    case invalidManifest(String)
    /// A manifest from a newer (or unknown) format version.
    case unsupportedFormatVersion(found: Int, supported: Int)
    /// A valid artifact that this package cannot run (ONNX graphs, an unknown random source, ...).
    case unsupportedArtifact(String)
    /// The configuration asks for something the artifact cannot do.
    case invalidConfiguration(String)
    /// The OS is too old for what the artifact needs (Core ML state and multifunction need iOS 18 / macOS 15).
    case unsupportedOS(String)
    /// A graph's output is missing or has an unexpected shape or type.
    case badOutput(String)

    public var errorDescription: String? {
        switch self {
        case .missingFile(let what): return "missing file: \(what)"
        case .invalidManifest(let what): return "invalid manifest: \(what)"
        case .unsupportedFormatVersion(let found, let supported):
            return "manifest format_version \(found) is not supported by this EVARKit (supports 1 to \(supported)); "
                + "update the app or re-export with a matching evar-export"
        case .unsupportedArtifact(let what): return "unsupported artifact: \(what)"
        case .invalidConfiguration(let what): return "invalid generation configuration: \(what)"
        case .unsupportedOS(let what): return "this OS cannot run the artifact: \(what)"
        case .badOutput(let what): return "unexpected graph output: \(what)"
        }
    }
}
