// Where the app finds artifacts: folders with a manifest.json under the bundle's Models/ (copied at
// build time) and under Documents/Models (imported with the file importer).

import EVARKit
import Foundation

/// An artifact the app can run.
struct Artifact: Identifiable, Hashable {
    var url: URL
    var manifest: Manifest
    var imported: Bool

    var id: URL { url }
    var name: String { url.lastPathComponent }

    /// e.g. "d16 · 310.3M params · fp16"
    var summary: String {
        let params = Double(manifest.model.transformer.parameterCount) / 1e6
        return String(format: "%@ · %.1fM params · %@ · %@", manifest.provenance.modelRef, params,
                      manifest.precision.weights.rawValue, manifest.kvCache.mode == .state ? "KV state" : "KV I/O")
    }
}

enum ArtifactLibrary {
    static var importedRoot: URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0].appendingPathComponent("Models")
    }

    /// Every readable artifact, bundled ones first, sorted by name; unreadable folders are reported.
    static func scan() -> (artifacts: [Artifact], problems: [String]) {
        var artifacts: [Artifact] = []
        var problems: [String] = []
        var roots: [(url: URL, imported: Bool)] = []
        if let bundled = Bundle.main.resourceURL?.appendingPathComponent("Models") {
            roots.append((bundled, false))
        }
        roots.append((importedRoot, true))
        for (root, imported) in roots {
            let children = (try? FileManager.default.contentsOfDirectory(
                at: root, includingPropertiesForKeys: [.isDirectoryKey], options: [.skipsHiddenFiles])) ?? []
            for folder in children.sorted(by: { $0.lastPathComponent < $1.lastPathComponent })
            where FileManager.default.fileExists(atPath: folder.appendingPathComponent("manifest.json").path) {
                do {
                    let manifest = try Manifest.load(artifactDirectory: folder)
                    try manifest.validate(artifactDirectory: folder)
                    artifacts.append(Artifact(url: folder, manifest: manifest, imported: imported))
                } catch {
                    problems.append("\(folder.lastPathComponent): \(error.localizedDescription)")
                }
            }
        }
        return (artifacts, problems)
    }

    /// Copies a user-picked artifact folder into Documents/Models (replacing one of the same name).
    static func importArtifact(from source: URL) throws -> URL {
        let scoped = source.startAccessingSecurityScopedResource()
        defer {
            if scoped { source.stopAccessingSecurityScopedResource() }
        }
        guard FileManager.default.fileExists(atPath: source.appendingPathComponent("manifest.json").path) else {
            throw EVARError.missingFile("manifest.json in \(source.lastPathComponent): pick an evar-export output folder")
        }
        try FileManager.default.createDirectory(at: importedRoot, withIntermediateDirectories: true)
        let destination = importedRoot.appendingPathComponent(source.lastPathComponent)
        if FileManager.default.fileExists(atPath: destination.path) {
            try FileManager.default.removeItem(at: destination)
        }
        try FileManager.default.copyItem(at: source, to: destination)
        return destination
    }
}
