// The VQVAE decoder: the last scale's f_hat → image tensor → 8-bit RGB per sample.

#if canImport(CoreML)
import CoreML
import Foundation

extension EVARPipeline {
    /// Runs the decoder on `fHat`: one `(H, W, 3)` byte array per sample, and the image size.
    func decode(fHat: MLMultiArray?) throws -> (pixels: [[UInt8]], height: Int, width: Int) {
        guard let fHat else {
            throw EVARError.badOutput("the scale loop produced no f_hat")
        }
        let decoder = try manifest.vqvaeDecoder()
        let input = try decoder.function.input(role: .fHat)
        let imageTensor = try decoder.function.output(role: .image)
        let model = try loadedModel(for: decoder)
        let feature = MLFeatureValue(multiArray: try fHat.evarConverted(to: input.dtype))
        let provider = try MLDictionaryFeatureProvider(dictionary: [input.name: feature])
        let result = try predict(model, provider, function: decoder)
        let image = try outputArray(result, imageTensor, function: decoder.function)
        return try ImageConversion.rgbImages(values: image.evarFloats(), shape: image.evarShape,
                                             range: imageTensor.range, tensor: imageTensor.name)
    }
}
#endif
