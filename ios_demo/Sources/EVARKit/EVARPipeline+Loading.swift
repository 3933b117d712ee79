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

    /// The compiled `.mlmodelc` of a package (relative to the artifact), compiled once per pipeline
    /// (`CompiledModels.compiledURL`: as shipped, from the cache, or compiled now and cached).
    func compiledModel(file: String) async throws -> URL {
        if let url = compiledURLs[file] {
            return url
        }
        let url = try await CompiledModels.compiledURL(file: file, artifactURL: artifactURL, files: manifest.files,
                                                       cacheRoot: options.compiledModelCache)
        compiledURLs[file] = url
        return url
    }

    /// The KV-cache state of a function's package, made once by the first function of that package that runs and
    /// shared by every function in it (they declare the same state buffers: the unguided functions of a trimmed
    /// artifact touch rows [0, B) of it, a split's prefill writes slots [0, T)). Reusing it across images is
    /// safe: scale si writes slots [begin_si, end_si) (the prefill [0, T)) before any attention reads them, so
    /// nothing from an earlier image is ever read.
    @available(iOS 18.0, macOS 15.0, *)
    func state(for function: Manifest.GraphFunction, from model: MLModel) -> MLState {
        if let state = kvStates[function.file] as? MLState {
            return state
        }
        let state = model.makeState()
        kvStates[function.file] = state
        return state
    }

    /// One prediction; with the state of the function's package when the function declares state buffers.
    func predict(_ model: MLModel, _ inputs: MLFeatureProvider, function: Manifest.GraphFunction) throws
        -> MLFeatureProvider {
        guard !(function.function.states ?? []).isEmpty else {
            return try model.prediction(from: inputs)
        }
        guard #available(iOS 18.0, macOS 15.0, *) else {
            throw EVARError.unsupportedOS("the KV cache is a Core ML state (iOS 18 / macOS 15)")
        }
        return try model.prediction(from: inputs, using: state(for: function, from: model))
    }
}
#endif
