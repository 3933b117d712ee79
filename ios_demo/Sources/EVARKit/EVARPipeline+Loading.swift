// Lazy model loading: compile an .mlpackage once (cached across launches), load each function on
// first use with `MLModelConfiguration.functionName` (or its own package, iOS 17 artifacts) on the units
// the manifest allows it, and make the KV state from the first step.

#if canImport(CoreML)
import CoreML
import Foundation

extension EVARPipeline {
    func functionKey(_ function: Manifest.GraphFunction) -> String {
        function.role + "/" + function.function.name
    }

    /// The loaded model of a function, loading (and compiling) it if needed.
    func model(for function: Manifest.GraphFunction) async throws -> MLModel {
        let key = functionKey(function)
        if let model = models[key] {
            return model
        }
        let url = try await compiledModel(file: function.file)
        let configuration = MLModelConfiguration()
        // A graph the manifest pins to the CPU (fhat_update) stays there whatever the app chose.
        configuration.computeUnits = function.computeUnits(requested: computeUnits).mlComputeUnits
        if let name = function.coreMLFunctionName {
            guard #available(iOS 18.0, macOS 15.0, *) else {
                throw EVARError.unsupportedOS("\(function.file) holds several functions (multifunction "
                                              + "models need iOS 18 / macOS 15)")
            }
            configuration.functionName = name
        }
        let model = try await MLModel.load(contentsOf: url, configuration: configuration)
        models[key] = model
        return model
    }

    /// A model that `loadResources()` already loaded (the scale loop itself never waits on loading).
    func loadedModel(for function: Manifest.GraphFunction) throws -> MLModel {
        guard let model = models[functionKey(function)] else {
            throw EVARError.invalidConfiguration("function \(function.function.name) is not loaded")
        }
        return model
    }

    /// The compiled `.mlmodelc` of a package (relative to the artifact): as shipped, from the cache, or
    /// compiled now and cached.
    func compiledModel(file: String) async throws -> URL {
        if let url = compiledURLs[file] {
            return url
        }
        let source = artifactURL.appendingPathComponent(file)
        guard FileManager.default.fileExists(atPath: source.path) else {
            throw EVARError.missingFile(file)
        }
        if source.pathExtension == "mlmodelc" {
            compiledURLs[file] = source
            return source
        }
        let destination = compiledCacheDirectory(file: file)?
            .appendingPathComponent(source.deletingPathExtension().lastPathComponent + ".mlmodelc")
        if let destination, FileManager.default.fileExists(atPath: destination.path) {
            compiledURLs[file] = destination
            return destination
        }
        let compiled = try await MLModel.compileModel(at: source)
        guard let destination else {
            compiledURLs[file] = compiled
            return compiled
        }
        try FileManager.default.createDirectory(at: destination.deletingLastPathComponent(),
                                                withIntermediateDirectories: true)
        try? FileManager.default.removeItem(at: destination)
        try FileManager.default.moveItem(at: compiled, to: destination)
        compiledURLs[file] = destination
        return destination
    }

    /// A cache folder named by the hashes of the package's files, so a re-export never reuses a stale
    /// compilation; nil (no caching) when the manifest lists no files for it.
    func compiledCacheDirectory(file: String) -> URL? {
        let prefix = file + "/"
        let entries = manifest.files
            .filter { $0.path == file || $0.path.hasPrefix(prefix) }
            .map { $0.path + " " + $0.sha256 }
            .sorted()
        guard !entries.isEmpty else { return nil }
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a, 64 bit
        for byte in entries.joined(separator: "\n").utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3
        }
        let root = options.compiledModelCache
            ?? FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask)[0].appendingPathComponent("EVARKit")
        return root.appendingPathComponent(String(hash, radix: 16))
    }

    /// The KV-cache state, made once from the first step function and shared by every scale's function
    /// (they declare the same state buffers). Reusing it across images is safe: scale si writes slots
    /// [begin_si, end_si) before any attention reads them, so nothing from an earlier image is ever read.
    @available(iOS 18.0, macOS 15.0, *)
    func state(from model: MLModel) -> MLState {
        if let state = kvState as? MLState {
            return state
        }
        let state = model.makeState()
        kvState = state
        return state
    }

    /// One prediction; `stateful` for decoder steps whose KV cache is a Core ML state.
    func predict(_ model: MLModel, _ inputs: MLFeatureProvider, stateful: Bool) throws -> MLFeatureProvider {
        guard stateful else {
            return try model.prediction(from: inputs)
        }
        guard #available(iOS 18.0, macOS 15.0, *) else {
            throw EVARError.unsupportedOS("the KV cache is a Core ML state (iOS 18 / macOS 15)")
        }
        return try model.prediction(from: inputs, using: state(from: model))
    }
}
#endif
