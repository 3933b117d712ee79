// Runs a Distilled Decoding artifact (`evar-export coreml --model DD_DIR`) with Core ML: the host draws the
// per-token noise (`FewStepNoise`, the numbers `evar sample --model DD_DIR` uses for the same seed), the
// student passes of the requested t-list run in order (pass k gets the labels, the noise and, after the first,
// the previous pass's tokens and vectors), and the last pass's f_hat goes to the VQVAE decoder. The same chain
// as evar/contract/few_step.py `run_passes`, which the Python runtime and the export's parity checks run.
//
// Every tensor is bound by its manifest role, never by a hard-coded name. The student has no guidance and no
// sampling filters (its tokens are the argmax of its logits): cfg does not apply, top-k / top-p are refused.

#if canImport(CoreML)
import CoreML
import Foundation

/// Generates images from a Distilled Decoding artifact directory in 1, 2 or more student passes.
///
/// An actor like `EVARPipeline`: models load lazily (or up front with `loadResources()`), one generation runs
/// at a time, and no state crosses from one generation to the next (a DD artifact has no KV cache).
public actor FewStepPipeline {
    public nonisolated let artifactURL: URL
    public nonisolated let manifest: FewStepManifest
    /// `compiledModelCache` applies; `verifySampling` does not (nothing is sampled).
    public nonisolated let options: EVARPipeline.Options
    /// The compute units the loaded models use.
    public private(set) var computeUnits: ComputeUnits

    var models: [String: MLModel] = [:]
    var compiledURLs: [String: URL] = [:]
    var generating = false

    /// Reads and checks the manifest; loads no model yet.
    public init(artifactURL: URL, computeUnits: ComputeUnits = .cpuAndNeuralEngine,
                options: EVARPipeline.Options = EVARPipeline.Options()) throws {
        self.artifactURL = artifactURL
        self.computeUnits = computeUnits
        self.options = options
        manifest = try FewStepManifest.load(artifactDirectory: artifactURL)
        try manifest.validate(artifactDirectory: artifactURL)
        if manifest.graphs.values.contains(where: { Self.needsFunctionName($0, in: manifest) }) {
            guard #available(iOS 18.0, macOS 15.0, *) else {
                throw EVARError.unsupportedOS("the passes are functions of one multifunction package "
                                              + "(iOS 18 / macOS 15)")
            }
        }
    }

    /// Whether a graph's function must be picked by name: its package holds several functions (every pass of
    /// `evar-export coreml` is a function of one shared package, weights stored once).
    static func needsFunctionName(_ graph: FewStepManifest.PassGraph, in manifest: FewStepManifest) -> Bool {
        graph.functions.count > 1 || manifest.graphs.values.filter { $0.file == graph.file }.count > 1
    }

    /// Every pass the artifact offers and the decoder.
    var allFunctions: [FewStepManifest.GraphFunction] {
        get throws {
            try manifest.fewStep.passes.map { try manifest.passFunction($0) } + [manifest.vqvaeDecoder()]
        }
    }

    /// Compiles (first time only) and loads every pass and the decoder now. Returns the milliseconds it took.
    @discardableResult
    public func loadResources() async throws -> Double {
        let watch = Stopwatch()
        let functions = try allFunctions
        for function in functions {
            _ = try await model(for: function)
        }
        return watch.milliseconds
    }

    /// Releases the models (they reload lazily).
    public func unloadResources() {
        models.removeAll()
    }

    /// Switches compute units; models reload on next use.
    public func setComputeUnits(_ units: ComputeUnits) {
        guard units != computeUnits else { return }
        unloadResources()
        computeUnits = units
    }

    /// Runs the passes of `tList` (nil: the manifest's `default_t_list`) and the decoder for one batch.
    ///
    /// `tokens` of the result are per scale, as for VAR artifacts; `timings.passMilliseconds` has one entry per
    /// pass (the host's noise counted in the first) and `timings.scaleMilliseconds` is empty.
    public func generate(_ configuration: GenerationConfiguration, tList: [Int]? = nil) async throws
        -> GenerationResult {
        guard !generating else {
            throw EVARError.invalidConfiguration("a generation is already running on this pipeline; await it first")
        }
        generating = true
        defer { generating = false }
        setComputeUnits(configuration.computeUnits)
        let labels = configuration.labels(batch: manifest.batchSize)
        try check(configuration, labels: labels)
        let passes = try manifest.passes(tList: tList ?? manifest.fewStep.defaultTList)
        let functions = try passes.map { try manifest.passFunction($0) }
        let decoder = try manifest.vqvaeDecoder()

        var loadMilliseconds = 0.0
        if (functions + [decoder]).contains(where: { models[$0.role] == nil }) {
            loadMilliseconds = try await loadResources()
        }

        let total = Stopwatch()
        let run = try runPasses(functions, labels: labels, configuration: configuration)
        let decodeWatch = Stopwatch()
        let decoded = try decode(fHat: run.fHat, decoder: decoder)
        let decodeMilliseconds = decodeWatch.milliseconds
        let timings = StageTimings(loadMilliseconds: loadMilliseconds, scaleMilliseconds: [],
                                   decodeMilliseconds: decodeMilliseconds, endToEndMilliseconds: total.milliseconds,
                                   passMilliseconds: run.milliseconds)
        let tokens = try manifest.tokensPerScale(run.tokens, batch: labels.count)
        return GenerationResult(pixels: decoded.pixels, height: decoded.height, width: decoded.width,
                                tokens: tokens, timings: timings, samplingMismatches: nil)
    }

    /// Rejects configurations the artifact cannot honour, before any work.
    func check(_ configuration: GenerationConfiguration, labels: [Int]) throws {
        let classes = manifest.model.transformer.numClasses
        guard labels.count == manifest.batchSize else {
            throw EVARError.invalidConfiguration("\(labels.count) labels for an artifact of batch \(manifest.batchSize)")
        }
        if let bad = labels.first(where: { $0 < 0 || $0 >= classes }) {
            throw EVARError.invalidConfiguration("class \(bad) is outside 0..<\(classes)")
        }
        guard configuration.firstSample >= 0 else {
            throw EVARError.invalidConfiguration("firstSample must not be negative")
        }
        if configuration.topK != nil || configuration.topP != nil {
            throw EVARError.invalidConfiguration("top-k / top-p: a Distilled Decoding student takes the argmax of its "
                                                 + "logits (it learnt the teacher's filtered tokens); leave them unset")
        }
    }

    // MARK: Models

    /// The loaded model of a pass or the decoder, loading (and compiling) it if needed.
    func model(for function: FewStepManifest.GraphFunction) async throws -> MLModel {
        if let model = models[function.role] {
            return model
        }
        let url = try await compiledModel(file: function.file)
        let configuration = MLModelConfiguration()
        configuration.computeUnits = (function.graph.computeUnits == .cpuOnly ? ComputeUnits.cpuOnly : computeUnits)
            .mlComputeUnits
        if Self.needsFunctionName(function.graph, in: manifest) {
            guard #available(iOS 18.0, macOS 15.0, *) else {
                throw EVARError.unsupportedOS("\(function.file) holds several functions (multifunction models need "
                                              + "iOS 18 / macOS 15)")
            }
            configuration.functionName = function.function.name
        }
        let model = try await MLModel.load(contentsOf: url, configuration: configuration)
        models[function.role] = model
        return model
    }

    func loadedModel(for function: FewStepManifest.GraphFunction) throws -> MLModel {
        guard let model = models[function.role] else {
            throw EVARError.invalidConfiguration("function \(function.function.name) is not loaded")
        }
        return model
    }

    func compiledModel(file: String) async throws -> URL {
        if let url = compiledURLs[file] {
            return url
        }
        let url = try await CompiledModels.compiledURL(file: file, artifactURL: artifactURL, files: manifest.files,
                                                       cacheRoot: options.compiledModelCache)
        compiledURLs[file] = url
        return url
    }

    // MARK: The passes

    struct PassRun {
        var fHat: MLMultiArray
        /// The last pass's tokens, row-major `(batch, L)`.
        var tokens: [Int32]
        var milliseconds: [Double]
    }

    /// What the inputs of one pass are made from.
    struct PassInputs {
        var labels: [Int]
        var noise: [Float]
        var symbols: [String: Int]
        /// The previous pass's tokens and vectors (nil before the first pass).
        var givenTokens: MLMultiArray?
        var givenVectors: MLMultiArray?
    }

    func runPasses(_ functions: [FewStepManifest.GraphFunction], labels: [Int],
                   configuration: GenerationConfiguration) throws -> PassRun {
        let noiseWatch = Stopwatch()
        let noise = FewStepNoise.sequence(seed: configuration.seed, firstSample: configuration.firstSample,
                                          batch: labels.count, patchNums: manifest.patchNums,
                                          dim: manifest.model.transformer.cvae)
        var noiseMilliseconds = noiseWatch.milliseconds
        var inputs = PassInputs(labels: labels, noise: noise, symbols: ["batch": labels.count])
        var fHat: MLMultiArray?
        var tokens: MLMultiArray?
        var milliseconds: [Double] = []
        for function in functions {
            let watch = Stopwatch()
            var features: [String: Any] = [:]
            for tensor in function.function.inputs {
                features[tensor.name] = MLFeatureValue(multiArray: try passInput(tensor, inputs: inputs))
            }
            let provider = try MLDictionaryFeatureProvider(dictionary: features)
            let result = try loadedModel(for: function).prediction(from: provider)
            inputs.givenTokens = try passOutput(result, .tokens, function)
            inputs.givenVectors = try passOutput(result, .vectors, function)
            tokens = inputs.givenTokens
            fHat = try passOutput(result, .fHat, function)
            milliseconds.append(watch.milliseconds + noiseMilliseconds)
            noiseMilliseconds = 0  // the noise is drawn once, before the first pass
        }
        guard let fHat, let tokens else {
            throw EVARError.invalidConfiguration("an empty t-list runs no pass")
        }
        return PassRun(fHat: fHat, tokens: try tokens.evarIntegers(), milliseconds: milliseconds)
    }

    /// The array for one input of a pass, chosen by the tensor's role.
    func passInput(_ tensor: FewStepManifest.PassTensor, inputs: PassInputs) throws -> MLMultiArray {
        let shape = try tensor.concreteShape(symbols: inputs.symbols)
        switch tensor.role {
        case .labels:
            guard shape.reduce(1, *) == inputs.labels.count else {
                throw EVARError.invalidManifest("labels input \(tensor.name) has shape \(shape) for "
                                                + "\(inputs.labels.count) labels")
            }
            let array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
            try array.evarFill(integers: inputs.labels.map { Int32($0) })
            return array
        case .noise:
            guard shape.reduce(1, *) == inputs.noise.count else {
                throw EVARError.invalidManifest("noise input \(tensor.name) has shape \(shape), EVARKit drew "
                                                + "\(inputs.noise.count) values (batch × L × Cvae)")
            }
            let array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
            try array.evarFill(floats: inputs.noise)
            return array
        case .givenTokens:
            guard let given = inputs.givenTokens else {
                throw EVARError.invalidManifest("\(tensor.name): a pass given tokens cannot come first in a t-list")
            }
            return try given.evarConverted(to: tensor.dtype)
        case .givenVectors:
            guard let given = inputs.givenVectors else {
                throw EVARError.invalidManifest("\(tensor.name): a pass given vectors cannot come first in a t-list")
            }
            return try given.evarConverted(to: tensor.dtype)
        default:
            throw EVARError.unsupportedArtifact("pass input \(tensor.name) has role \(tensor.role.rawValue), "
                                                + "which EVARKit does not know how to feed")
        }
    }

    func passOutput(_ result: MLFeatureProvider, _ role: FewStepManifest.PassTensorRole,
                    _ function: FewStepManifest.GraphFunction) throws -> MLMultiArray {
        let tensor = try function.function.output(role: role)
        guard let array = result.featureValue(for: tensor.name)?.multiArrayValue else {
            throw EVARError.badOutput("function \(function.function.name) returned no array \(tensor.name)")
        }
        return array
    }

    /// The VQVAE decoder on the last pass's f_hat: one `(H, W, 3)` byte array per sample, and the image size.
    func decode(fHat: MLMultiArray, decoder: FewStepManifest.GraphFunction) throws
        -> (pixels: [[UInt8]], height: Int, width: Int) {
        let input = try decoder.function.input(role: .fHat)
        let imageTensor = try decoder.function.output(role: .image)
        let feature = MLFeatureValue(multiArray: try fHat.evarConverted(to: input.dtype))
        let provider = try MLDictionaryFeatureProvider(dictionary: [input.name: feature])
        let result = try loadedModel(for: decoder).prediction(from: provider)
        guard let image = result.featureValue(for: imageTensor.name)?.multiArrayValue else {
            throw EVARError.badOutput("function \(decoder.function.name) returned no array \(imageTensor.name)")
        }
        return try ImageConversion.rgbImages(values: image.evarFloats(), shape: image.evarShape,
                                             range: imageTensor.range, tensor: imageTensor.name)
    }
}
#endif
