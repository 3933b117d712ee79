// The scale loop of a host-sampled artifact (`evar-export coreml --target ane`, manifest
// `sampling.where == "host"`): per scale the step function (the transformer, on the Neural Engine; its KV
// cache is the shared state) returns raw logits for the 2·batch conditional and unconditional rows,
// `Sampler` applies guidance, top-k / top-p and the inverse-CDF draw on the host, and the scale's
// fhat_update function (pinned to the CPU by the manifest) adds the drawn tokens to f_hat. The same
// decisions as evar/contract/host_sampling.py, which the Python runtime runs.

#if canImport(CoreML)
import CoreML
import Foundation

extension EVARPipeline {
    func runHostSampledScales(_ configuration: GenerationConfiguration, labels: [Int]) throws -> ScaleLoopOutput {
        var output = ScaleLoopOutput()
        let batch = manifest.batchSize
        let symbols = ["batch": batch, "cfg_batch": 2 * batch]
        let sampler = Sampler(topK: configuration.topK ?? manifest.sampling.topK,
                              topP: configuration.topP ?? manifest.sampling.topP)
        let onehot = Sampler.classOnehot(labels: labels, unconditional: manifest.unconditionalLabel)
        var fHat: MLMultiArray?
        for scale in manifest.patchNums.indices {
            let watch = Stopwatch()
            let step = try manifest.stepFunction(scaleIndex: scale)
            let update = try manifest.fhatUpdate(scaleIndex: scale)
            let tokens = manifest.patchNums[scale] * manifest.patchNums[scale]

            var features: [String: Any] = [:]
            for tensor in step.function.inputs {
                let shape = try tensor.concreteShape(symbols: symbols)
                let array: MLMultiArray
                switch tensor.role {
                case .classOnehot?:
                    guard shape.reduce(1, *) == onehot.count else {
                        throw EVARError.invalidManifest("\(tensor.name) has shape \(shape) for \(labels.count) labels")
                    }
                    array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
                    try array.evarFill(floats: onehot)
                case .fHat?:
                    array = try fHat?.evarConverted(to: tensor.dtype) ?? MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
                default:
                    throw EVARError.unsupportedArtifact("host-sampled step input \(tensor.name) has role "
                                                        + "\(tensor.role?.rawValue ?? "none"), which EVARKit does not feed")
                }
                features[tensor.name] = MLFeatureValue(multiArray: array)
            }
            let result = try predict(try loadedModel(for: step), try MLDictionaryFeatureProvider(dictionary: features),
                                     function: step)
            let logits = try outputArray(result, try step.function.output(role: .rawLogits), function: step.function)
            let shape = logits.evarShape
            guard shape.count == 3, shape[0] == 2 * batch, shape[1] == tokens else {
                throw EVARError.badOutput("raw logits have shape \(shape), expected (\(2 * batch), \(tokens), V)")
            }
            var values = try logits.evarFloats()
            var ratio: Double? = Sampler.guidanceRatio(cfg: configuration.cfg, scaleIndex: scale,
                                                       numScales: manifest.patchNums.count)
            if configuration.cfg == 0 {  // no guidance: the conditional rows alone
                values = Array(values[0..<(batch * tokens * shape[2])])
                ratio = nil
            }
            let uniforms = SplitMix64Uniforms.scaleUniforms(
                seed: configuration.seed, scaleIndex: scale, batch: batch, tokens: tokens,
                firstSample: configuration.firstSample)
            let drawn = sampler.sampleScale(logits: values, batch: batch, tokens: tokens, vocab: shape[2],
                                            guidanceRatio: ratio, uniforms: uniforms)
            output.tokens.append(drawn)

            var updateFeatures: [String: Any] = [:]
            for tensor in update.function.inputs {
                let shape = try tensor.concreteShape(symbols: symbols)
                let array: MLMultiArray
                switch tensor.role {
                case .fHat?:
                    array = try fHat?.evarConverted(to: tensor.dtype) ?? MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
                case .idx?:
                    array = try MLMultiArray.evarMake(shape: shape, dtype: tensor.dtype)
                    try array.evarFill(integers: drawn)
                default:
                    throw EVARError.unsupportedArtifact("fhat_update input \(tensor.name) has role "
                                                        + "\(tensor.role?.rawValue ?? "none"), which EVARKit does not feed")
                }
                updateFeatures[tensor.name] = MLFeatureValue(multiArray: array)
            }
            let updated = try predict(try loadedModel(for: update),
                                      try MLDictionaryFeatureProvider(dictionary: updateFeatures), function: update)
            fHat = try outputArray(updated, try update.function.output(role: .fHat), function: update.function)
            output.milliseconds.append(watch.milliseconds)
        }
        output.fHat = fHat
        return output
    }
}
#endif
