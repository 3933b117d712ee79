// Runs an exported EVAR artifact with Core ML: the scale loop of per-scale decoder-step functions
// (KV cache in a Core ML state, or as inputs/outputs for iOS 17 artifacts), then the VQVAE decoder.
//
// Everything the pipeline feeds or reads is found through the manifest by role (labels, f_hat,
// uniforms, cfg, KV tensors, idx, logits, image), never by a hard-coded name, so any artifact that
// `evar-export coreml` writes runs here unchanged.

#if canImport(CoreML)
import CoreML
import Foundation
#if canImport(CoreGraphics)
import CoreGraphics
#endif

/// Generates images from an `evar-export coreml` artifact directory.
///
/// Models load lazily: the first `generate` compiles (once per artifact, cached) and loads each
/// function when it is first needed; call `loadResources()` to pay that cost up front (the bench
/// does, to time it separately).
///
/// An actor: the model cache, the compiled URLs and the KV state are mutated by async methods, so every
/// access is serialised by the actor and Swift 6's strict checking can prove it (the app calls it from the
/// main actor, the bench from its own task). Generations on one pipeline run one at a time; a `generate`
/// suspends only while loading models, before its first scale, so two generations never interleave scales
/// on the shared KV state.
public actor EVARPipeline {
    /// Settings that do not change the image.
    public struct Options: Sendable {
        /// Recompute in-graph samples on the host from the graph's logits and count disagreements
        /// (`GenerationResult.samplingMismatches`). For checking an artifact on a device: the check is
        /// outside the per-scale times but inside the end-to-end time, so do not benchmark with it.
        public var verifySampling: Bool
        /// Where compiled `.mlmodelc` directories are kept between launches (default: Caches/EVARKit).
        public var compiledModelCache: URL?

        public init(verifySampling: Bool = false, compiledModelCache: URL? = nil) {
            self.verifySampling = verifySampling
            self.compiledModelCache = compiledModelCache
        }
    }

    public nonisolated let artifactURL: URL
    public nonisolated let manifest: Manifest
    public nonisolated let options: Options
    /// The compute units the loaded models use.
    public private(set) var computeUnits: ComputeUnits

    var models: [String: MLModel] = [:]
    var compiledURLs: [String: URL] = [:]
    /// The `MLState`s holding the KV caches, one per package file (typed `AnyObject` because `MLState` needs
    /// iOS 18): the compressed model's functions share decoder_step.mlpackage's, a split's early model has its own.
    var kvStates: [String: AnyObject] = [:]
    /// True while `generate` runs (see there).
    var generating = false

    /// Reads and checks the manifest; loads no model yet.
    public init(artifactURL: URL, computeUnits: ComputeUnits = .cpuAndNeuralEngine,
                options: Options = Options()) throws {
        self.artifactURL = artifactURL
        self.computeUnits = computeUnits
        self.options = options
        manifest = try Manifest.load(artifactDirectory: artifactURL)
        try manifest.validate(artifactDirectory: artifactURL)
        if manifest.kvCache.mode == .state {
            guard #available(iOS 18.0, macOS 15.0, *) else {
                throw EVARError.unsupportedOS("the KV cache is a Core ML state (iOS 18 / macOS 15); "
                                              + "re-export with --target iOS17 for older systems")
            }
        }
    }

    /// Every function a generation uses, in the order it uses them (a split's prefill after its early scales).
    var allFunctions: [Manifest.GraphFunction] {
        get throws {
            var functions = try manifest.patchNums.indices.map { try manifest.stepFunction(scaleIndex: $0) }
            if let split = manifest.splitScale {
                functions.insert(try manifest.prefillFunction(), at: split)
            }
            if manifest.samplesOnHost {
                functions += try manifest.patchNums.indices.map { try manifest.fhatUpdate(scaleIndex: $0) }
            }
            functions.append(try manifest.vqvaeDecoder())
            return functions
        }
    }

    /// Compiles (first time only) and loads every function now. Returns the milliseconds it took.
    @discardableResult
    public func loadResources() async throws -> Double {
        let watch = Stopwatch()
        let functions = try allFunctions
        for function in functions {
            _ = try await model(for: function)
        }
        return watch.milliseconds
    }

    /// Releases the models and the KV state (they reload lazily).
    public func unloadResources() {
        models.removeAll()
        kvStates.removeAll()
    }

    /// Switches compute units; models reload on next use.
    public func setComputeUnits(_ units: ComputeUnits) {
        guard units != computeUnits else { return }
        unloadResources()
        computeUnits = units
    }

    /// Runs the scale loop and the decoder for one batch (the artifact's batch size).
    public func generate(_ configuration: GenerationConfiguration) async throws -> GenerationResult {
        // The actor may interleave a second call at the loading `await` below: refuse it rather than let it
        // unload models or share the KV state mid-generation.
        guard !generating else {
            throw EVARError.invalidConfiguration("a generation is already running on this pipeline; await it first")
        }
        generating = true
        defer { generating = false }
        setComputeUnits(configuration.computeUnits)
        let batch = manifest.batchSize
        let labels = configuration.labels(batch: batch)
        try check(configuration, labels: labels)

        // Load what is missing before the clock for the generation starts.
        var loadMilliseconds = 0.0
        let functionCount = try allFunctions.count
        if models.count < functionCount {
            loadMilliseconds = try await loadResources()
        }

        let total = Stopwatch()
        let scales = try runScales(configuration, labels: labels)
        let decodeWatch = Stopwatch()
        let decoded = try decode(fHat: scales.fHat)
        let decodeMilliseconds = decodeWatch.milliseconds
        let timings = StageTimings(loadMilliseconds: loadMilliseconds, scaleMilliseconds: scales.milliseconds,
                                   decodeMilliseconds: decodeMilliseconds, endToEndMilliseconds: total.milliseconds)
        return GenerationResult(pixels: decoded.pixels, height: decoded.height, width: decoded.width,
                                tokens: scales.tokens, timings: timings, samplingMismatches: scales.mismatches)
    }

    /// Rejects configurations that the artifact cannot honour, before any work.
    func check(_ configuration: GenerationConfiguration, labels: [Int]) throws {
        let classes = manifest.model.transformer.numClasses
        guard labels.count == manifest.batchSize else {
            throw EVARError.invalidConfiguration("\(labels.count) labels for an artifact of batch \(manifest.batchSize)")
        }
        if let bad = labels.first(where: { $0 < 0 || $0 >= classes }) {
            throw EVARError.invalidConfiguration("class \(bad) is outside 0..<\(classes)")
        }
        guard configuration.cfg >= 0, configuration.firstSample >= 0 else {
            throw EVARError.invalidConfiguration("cfg and firstSample must not be negative")
        }
        if manifest.sampling.inGraph {
            let sampling = manifest.sampling
            if let k = configuration.topK, k != sampling.topK {
                throw EVARError.invalidConfiguration("top-k \(k): this artifact samples in-graph with top-k "
                                                     + "\(sampling.topK) baked in; re-export to change it")
            }
            if let p = configuration.topP, p != sampling.topP {
                throw EVARError.invalidConfiguration("top-p \(p): this artifact samples in-graph with top-p "
                                                     + "\(sampling.topP) baked in; re-export to change it")
            }
        }
    }
}

/// What one generation produced.
public struct GenerationResult: Sendable {
    /// One `(H, W, 3)` RGB byte array per sample.
    public var pixels: [[UInt8]]
    public var height: Int
    public var width: Int
    /// Tokens per scale, row-major `(batch, pn²)`.
    public var tokens: [[Int32]]
    public var timings: StageTimings
    /// With `Options.verifySampling`: host and graph draws that differ (nil when not checked).
    public var samplingMismatches: Int?

    #if canImport(CoreGraphics)
    /// The images as CGImages.
    public var images: [CGImage] {
        pixels.compactMap { ImageConversion.cgImage(rgb: $0, height: height, width: width) }
    }
    #endif
}
#endif
