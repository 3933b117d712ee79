// Compiling an artifact's `.mlpackage` files once and keeping the result between launches, for every kind of
// artifact (`EVARPipeline`, `FewStepPipeline`).

#if canImport(CoreML)
import CoreML
import Foundation

enum CompiledModels {
    /// The compiled `.mlmodelc` of a package (relative to `artifactURL`): as shipped, from the cache, or
    /// compiled now and cached.
    static func compiledURL(file: String, artifactURL: URL, files: [Manifest.FileEntry],
                            cacheRoot: URL?) async throws -> URL {
        let source = artifactURL.appendingPathComponent(file)
        guard FileManager.default.fileExists(atPath: source.path) else {
            throw EVARError.missingFile(file)
        }
        if source.pathExtension == "mlmodelc" {
            return source
        }
        let destination = cacheDirectory(file: file, files: files, cacheRoot: cacheRoot)?
            .appendingPathComponent(source.deletingPathExtension().lastPathComponent + ".mlmodelc")
        if let destination, FileManager.default.fileExists(atPath: destination.path) {
            return destination
        }
        let compiled = try await MLModel.compileModel(at: source)
        guard let destination else {
            return compiled
        }
        try FileManager.default.createDirectory(at: destination.deletingLastPathComponent(),
                                                withIntermediateDirectories: true)
        try? FileManager.default.removeItem(at: destination)
        try FileManager.default.moveItem(at: compiled, to: destination)
        return destination
    }

    /// A cache folder named by the hashes of the package's files, so a re-export never reuses a stale
    /// compilation; nil (no caching) when the manifest lists no files for it.
    static func cacheDirectory(file: String, files: [Manifest.FileEntry], cacheRoot: URL?) -> URL? {
        let prefix = file + "/"
        let entries = files
            .filter { $0.path == file || $0.path.hasPrefix(prefix) }
            .map { $0.path + " " + $0.sha256 }
            .sorted()
        guard !entries.isEmpty else { return nil }
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a, 64 bit
        for byte in entries.joined(separator: "\n").utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3
        }
        let root = cacheRoot
            ?? FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask)[0].appendingPathComponent("EVARKit")
        return root.appendingPathComponent(String(hash, radix: 16))
    }
}
#endif
