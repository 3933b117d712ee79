// Decoder output (N, 3, H, W) floats → 8-bit RGB, exactly as evar.data.to_uint8_nhwc does it:
// clamp to the range, scale to [0, 255] in Float, round half to even, NaN as the lower bound
// (Tests/Fixtures/image.json).

#if canImport(CoreGraphics)
import CoreGraphics
import Foundation
#endif

/// Conversions from image tensors to pixels.
public enum ImageConversion {
    /// One sample's pixels, row-major `(H, W, 3)` from a planar `(3, H, W)` slice of `chw`.
    ///
    /// - Parameters:
    ///   - range: the tensor's value range (`[-1, 1]` for EVAR's decoder).
    public static func rgbBytes(chw: ArraySlice<Float>, height: Int, width: Int,
                                range: (lower: Float, upper: Float) = (-1, 1)) -> [UInt8] {
        precondition(chw.count == 3 * height * width, "need 3×\(height)×\(width) values")
        let base = chw.startIndex
        let plane = height * width
        let scale = 255 / (range.upper - range.lower)
        var out = [UInt8](repeating: 0, count: 3 * plane)
        for pixel in 0..<plane {
            for channel in 0..<3 {
                let value = chw[base + channel * plane + pixel]
                // A NaN (a diverged decoder) is the lower bound, as in evar.data.to_uint8_nhwc: min/max pass
                // NaN through, and UInt8(NaN) traps. ±inf clamp like any out-of-range value.
                let x = value.isNaN ? range.lower : min(max(value, range.lower), range.upper)
                // For [-1, 1] this is (x + 1) · 127.5, the reference's two Float operations.
                let scaled = range.lower == -1 && range.upper == 1 ? (x + 1) * 127.5 : (x - range.lower) * scale
                out[pixel * 3 + channel] = UInt8(scaled.rounded(.toNearestOrEven))
            }
        }
        return out
    }

    /// Every sample's pixels from a decoder output: row-major `values` of `shape` `(N, 3, H, W)`, in `range`
    /// (the image tensor's declared range; nil: `[-1, 1]`). Any other shape is a bad output, named `tensor`.
    public static func rgbImages(values: [Float], shape: [Int], range: [Double]?, tensor: String) throws
        -> (pixels: [[UInt8]], height: Int, width: Int) {
        guard shape.count == 4, shape[1] == 3, values.count == shape.reduce(1, *) else {
            throw EVARError.badOutput("image \(tensor) has shape \(shape), expected (N, 3, H, W)")
        }
        var bounds: (lower: Float, upper: Float) = (-1, 1)
        if let range, range.count == 2 {
            bounds = (Float(range[0]), Float(range[1]))
        }
        let (height, width) = (shape[2], shape[3])
        let plane = 3 * height * width
        let pixels = (0..<shape[0]).map { sample in
            rgbBytes(chw: values[(sample * plane)..<((sample + 1) * plane)], height: height, width: width,
                     range: bounds)
        }
        return (pixels, height, width)
    }

    #if canImport(CoreGraphics)
    /// A CGImage of `(H, W, 3)` RGB bytes (sRGB, opaque).
    public static func cgImage(rgb: [UInt8], height: Int, width: Int) -> CGImage? {
        var rgba = [UInt8](repeating: 255, count: 4 * height * width)
        for pixel in 0..<(height * width) {
            rgba[pixel * 4] = rgb[pixel * 3]
            rgba[pixel * 4 + 1] = rgb[pixel * 3 + 1]
            rgba[pixel * 4 + 2] = rgb[pixel * 3 + 2]
        }
        guard let provider = CGDataProvider(data: Data(rgba) as CFData),
              let space = CGColorSpace(name: CGColorSpace.sRGB) else { return nil }
        return CGImage(width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: 4 * width,
                       space: space, bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                       provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
    }
    #endif
}
