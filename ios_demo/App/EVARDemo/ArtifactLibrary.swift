// Where the app finds artifacts: folders with a manifest.json under the bundle's Models/ (copied at
// build time) and under Documents/Models (imported with the file importer).

import EVARKit
import Foundation

/// An artifact the app can run: a VAR export (scale by scale) or a Distilled Decoding one (few student passes).
struct Artifact: Identifiable, Hashable {
    var url: URL
    var kind: EVARArtifact
    var imported: Bool

    var id: URL { url }
    var name: String { url.lastPathComponent }
    var model: Manifest.ModelConfig { kind.model }

    /// The generator's parameters: the VAR transformer, or the DD student.
    var parameterCount: Int {
        switch kind {
        case .scaleByScale(let manifest): return manifest.model.transformer.parameterCount
        case .fewStep(let manifest): return manifest.studentParameterCount
        }
    }

    /// The t-lists a Distilled Decoding artifact offers (one step, two steps, ...); empty for VAR artifacts.
    var tListChoices: [[Int]] {
        if case .fewStep(let manifest) = kind { return manifest.availableTLists }
        return []
    }

    /// The t-list a Distilled Decoding artifact runs unless another is picked; nil for VAR artifacts.
    var defaultTList: [Int]? {
        if case .fewStep(let manifest) = kind { return manifest.fewStep.defaultTList }
        return nil
    }

    /// e.g. "d16 · 310.3M params · fp16 · KV state", or "digits-dd · 1.4M params · fp16 · DD 1–2 steps"
    var summary: String {
        let params = Double(parameterCount) / 1e6
        let detail: String
        switch kind {
        case .scaleByScale(let manifest):
            detail = manifest.kvCache.mode == .state ? "KV state" : "KV I/O"
        case .fewStep(let manifest):
            let counts = manifest.availableTLists.map(\.count)
            detail = "DD \(counts.min() ?? 1)–\(counts.max() ?? 1) steps"
        }
        return String(format: "%@ · %.1fM params · %@ · %@", kind.provenance.modelRef, params,
                      kind.precision.weights.rawValue, detail)
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
                    let kind = try EVARArtifact.load(artifactDirectory: folder)
                    try kind.validate(artifactDirectory: folder)
                    artifacts.append(Artifact(url: folder, kind: kind, imported: imported))
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
