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
        let result = try predict(model, provider, stateful: false)
        let image = try outputArray(result, imageTensor, function: decoder.function)
        let shape = image.evarShape
        guard shape.count == 4, shape[1] == 3 else {
            throw EVARError.badOutput("image \(imageTensor.name) has shape \(shape), expected (N, 3, H, W)")
        }
        let values = try image.evarFloats()
        var range: (lower: Float, upper: Float) = (-1, 1)
        if let declared = imageTensor.range, declared.count == 2 {
            range = (Float(declared[0]), Float(declared[1]))
        }
        let (height, width) = (shape[2], shape[3])
        let plane = 3 * height * width
        let pixels = (0..<shape[0]).map { sample in
            ImageConversion.rgbBytes(chw: values[(sample * plane)..<((sample + 1) * plane)], height: height,
                                     width: width, range: range)
        }
        return (pixels, height, width)
    }
}
#endif
