// The scale loop. Per scale si the step function takes labels, the running f_hat (zeros at si = 0),
// this scale's uniforms, cfg and the KV cache, and returns logits (after CFG), the sampled idx, the new
// f_hat and (KV as I/O) the present cache; the last f_hat goes to the VQVAE decoder.
//
// Which function runs scale si is the manifest's recipe (Manifest+GenerationModes.swift), followed as the
// Python runtimes follow it: a scale split runs the early model's functions (their own cache) before
// split_scale, then the prefill (labels + the early tokens → the compressed model's cache), then decoder_step;
// CFG trimming keeps rows [0, B) of the cache at cfg_until_scale (KV as I/O; a state needs nothing) and runs
// the unguided functions from there.

#if canImport(CoreML)
import CoreML
import Foundation

extension EVARPipeline {
    struct ScaleLoopOutput {
        var fHat: MLMultiArray?
        var tokens: [[Int32]] = []
        var milliseconds: [Double] = []
        var mismatches: Int?
    }

    /// What the inputs of one scale are made from.
    struct ScaleContext {
        var scale: Int
        var patch: Int
        var begin: Int
        var end: Int
        var batch: Int
        var labels: [Int]
        var configuration: GenerationConfiguration
        var fHat: MLMultiArray?
        /// Present KV of the previous scale by (role, layer), fed back as past.
        var cache: [String: MLMultiArray]
        /// Scale split: this scale runs the early model, whose cache is `earlyCache` (other heads, other layers).
        var early = false
        var earlyCache: [String: MLMultiArray] = [:]
        /// Scale split: the early scales' tokens, row-major (batch, pn²) each, for the prefill.
        var earlyTokens: [[Int32]] = []

        /// Sizes of the symbolic dims a manifest may use.
        var symbols: [String: Int] {
            ["batch": batch, "cfg_batch": 2 * batch, "sequence_length": patch * patch,
             "past_sequence_length": begin, "total_sequence_length": end]
        }
    }

    static func cacheKey(_ role: Manifest.TensorRole, layer: Int?) -> String {
        let kind = (role == .pastKey || role == .presentKey) ? "key" : "value"
        let slot = layer.map { String($0) } ?? "stacked"
        return kind + "/" + slot
    }

    func runScales(_ configuration: GenerationConfiguration, labels: [Int]) throws -> ScaleLoopOutput {
        if manifest.samplesOnHost {  // the manifest says where sampling runs: follow it
            return try runHostSampledScales(configuration, labels: labels)
        }
        guard manifest.sampling.inGraph else {
            throw EVARError.unsupportedArtifact("sampling.in_graph is false without sampling.where \"host\" "
                                                + "and an fhat_update graph; re-export the artifact")
        }
        var output = ScaleLoopOutput()
        var context = ScaleContext(scale: 0, patch: 1, begin: 0, end: 0, batch: manifest.batchSize, labels: labels,
                                   configuration: configuration, fHat: nil, cache: [:])
        for scale in manifest.patchNums.indices {
            let watch = Stopwatch()
            if scale == manifest.splitScale {  // the compressed model's cache of the early scales, one pass
                context.cache = try prefill(context)
            }
            if scale == manifest.cfgUntilScale {  // the conditional rows only from here (a state has nothing to cut)
                let batch = context.batch
                context.cache = try context.cache.mapValues { try $0.evarRows(batch) }
            }
            let step = try manifest.stepFunction(scaleIndex: scale)
            let range = manifest.tokenRange(scaleIndex: scale, function: step.function)
            context.scale = scale
            context.patch = manifest.patchNums[scale]
            context.begin = range.begin
            context.end = range.end
            context.early = manifest.splitScale.map { scale < $0 } ?? false

            var features: [String: Any] = [:]
            for tensor in step.function.inputs {
                features[tensor.name] = MLFeatureValue(multiArray: try inputArray(for: tensor, context: context))
            }
            let model = try loadedModel(for: step)
            let provider = try MLDictionaryFeatureProvider(dictionary: features)
            let result = try predict(model, provider, function: step)

            let idx = try outputArray(result, step.function.output(role: .idx), function: step.function)
            let tokens = try idx.evarIntegers()
            output.tokens.append(tokens)
            context.fHat = try outputArray(result, step.function.output(role: .fHat), function: step.function)
            var presents: [String: MLMultiArray] = [:]
            for tensor in step.function.outputs where tensor.role == .presentKey || tensor.role == .presentValue {
                presents[Self.cacheKey(tensor.role!, layer: tensor.layer)] =
                    try outputArray(result, tensor, function: step.function)
            }
            if context.early {
                context.earlyCache = presents
                context.earlyTokens.append(tokens)
            } else {
                context.cache = presents
            }
            output.milliseconds.append(watch.milliseconds)
            if options.verifySampling {  // after the clock: checking is not part of the latency
                let mismatches = try hostSamplingMismatches(result, step: step.function, context: context,
                                                            graphTokens: tokens)
                output.mismatches = (output.mismatches ?? 0) + mismatches
            }
        }
        output.fHat = context.fHat
        return output
    }

    /// Scale split: the prefill on the labels and the early tokens. KV as I/O: its presents, by (role, layer), are
    /// decoder_step's pasts at the split; a state: it writes slots [0, T) of its package's state (the one
    /// decoder_step shares), and nothing comes back.
    func prefill(_ context: ScaleContext) throws -> [String: MLMultiArray] {
        let function = try manifest.prefillFunction()
        var features: [String: Any] = [:]
        for tensor in function.function.inputs {
            features[tensor.name] = MLFeatureValue(multiArray: try inputArray(for: tensor, context: context))
        }
        let result = try predict(try loadedModel(for: function), try MLDictionaryFeatureProvider(dictionary: features),
                                 function: function)
        guard (function.function.states ?? []).isEmpty else { return [:] }
        var cache: [String: MLMultiArray] = [:]
        for tensor in function.function.outputs where tensor.role == .presentKey || tensor.role == .presentValue {
            cache[Self.cacheKey(tensor.role!, layer: tensor.layer)] = try outputArray(result, tensor,
                                                                                     function: function.function)
        }
        return cache
    }

    /// The array for one input, chosen by the tensor's role.
    func inputArray(for tensor: Manifest.Tensor, context: ScaleContext) throws -> MLMultiArray {
        let shape = try tensor.concreteShape(symbols: context.symbols)
        let count = shape.reduce(1, *)
        let configuration = context.configuration
        func filled(_ values: [Float]) throws -> MLMultiArray {
            guard values.count == count else {
                throw EVARError.invalidManifest("input \(tensor.name) has shape \(shape), EVARKit has \(values.count) values")
            }
            let array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
            try array.evarFill(floats: values)
            return array
        }
        switch tensor.role {
        case .labels?:
            var labels = context.labels
            if shape.first == 2 * context.batch {  // a graph that expects the CFG batch from the caller
                labels += [Int](repeating: manifest.unconditionalLabel, count: context.batch)
            }
            guard labels.count == count else {
                throw EVARError.invalidManifest("labels input \(tensor.name) has shape \(shape) for batch \(context.batch)")
            }
            let array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
            try array.evarFill(integers: labels.map { Int32($0) })
            return array
        case .fHat?:
            if let fHat = context.fHat {
                return try fHat.evarConverted(to: tensor.dtype)
            }
            return try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
        case .uniforms?:
            return try filled(SplitMix64Uniforms.scaleUniforms(
                seed: configuration.seed, scaleIndex: context.scale, batch: context.batch,
                tokens: context.patch * context.patch, firstSample: configuration.firstSample))
        case .cfg?:
            return try filled([Float](repeating: Float(configuration.cfg), count: count))
        case .scaleIndex?:
            return try filled([Float](repeating: Float(context.scale), count: count))
        case .idx?:  // the prefill of a scale split: the early scales' tokens
            let tokens = Manifest.prefillTokens(context.earlyTokens, batch: context.batch)
            guard tokens.count == count else {
                throw EVARError.invalidManifest("prefill input \(tensor.name) has shape \(shape), the early scales "
                                                + "drew \(tokens.count) tokens")
            }
            let array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
            try array.evarFill(integers: tokens)
            return array
        case .pastKey?, .pastValue?:
            let cache = context.early ? context.earlyCache : context.cache
            if let past = cache[Self.cacheKey(tensor.role!, layer: tensor.layer)] {
                return try past.evarConverted(to: tensor.dtype)
            }
            // KV as I/O with a declared past at scale 0: an empty history is zeros of that shape.
            return try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
        default:
            throw EVARError.unsupportedArtifact("input \(tensor.name) has role \(tensor.role?.rawValue ?? "none"), "
                                                + "which EVARKit does not know how to feed")
        }
    }

    func outputArray(_ result: MLFeatureProvider, _ tensor: Manifest.Tensor,
                     function: Manifest.Function) throws -> MLMultiArray {
        guard let array = result.featureValue(for: tensor.name)?.multiArrayValue else {
            throw EVARError.badOutput("function \(function.name) returned no array \(tensor.name)")
        }
        return array
    }

    /// Redraws the scale's tokens on the host from the graph's logits and counts disagreements.
    /// fp16 logits can legitimately flip a draw that sits within rounding of a CDF boundary.
    func hostSamplingMismatches(_ result: MLFeatureProvider, step: Manifest.Function, context: ScaleContext,
                                graphTokens: [Int32]) throws -> Int {
        let logitsTensor = try step.output(role: .logits)
        let logitsArray = try outputArray(result, logitsTensor, function: step)
        let shape = logitsArray.evarShape
        let tokens = context.patch * context.patch
        guard shape.count == 3, shape[1] == tokens else {
            throw EVARError.badOutput("logits \(logitsTensor.name) have shape \(shape), expected (rows, \(tokens), V)")
        }
        // Logits of the documented interface are already guided (batch rows); 2·batch rows are the raw halves.
        let guided = shape[0] == 2 * context.batch && context.batch > 0
        let ratio = Sampler.guidanceRatio(cfg: context.configuration.cfg, scaleIndex: context.scale,
                                          numScales: manifest.patchNums.count)
        let sampler = Sampler(topK: manifest.sampling.topK, topP: manifest.sampling.topP)
        let uniforms = SplitMix64Uniforms.scaleUniforms(
            seed: context.configuration.seed, scaleIndex: context.scale, batch: context.batch, tokens: tokens,
            firstSample: context.configuration.firstSample)
        let host = sampler.sampleScale(logits: try logitsArray.evarFloats(), batch: context.batch, tokens: tokens,
                                       vocab: shape[2], guidanceRatio: guided ? ratio : nil, uniforms: uniforms)
        return zip(host, graphTokens).filter { pair in pair.0 != pair.1 }.count
    }
}
#endif
