// The per-token Gaussian noise of Distilled Decoding, ported from evar/contract/few_step.py.
//
// A DD student maps noise to tokens deterministically, so the noise is the whole random part of a generation:
// the same seed must give the same numbers here as in PyTorch and onnxruntime. It is made on the host from
// EVAR's portable uniforms (`SplitMix64Uniforms`), never in a graph. Tests/Fixtures/dd_noise.json holds the
// Python reference values.

import Foundation

/// Standard normals for DD artifacts: Box–Muller on `splitmix64-counter-v1`, one stream per scale, numbered by
/// sample so a sample's noise does not depend on the batch it is generated in.
///
/// Normal `d` of token `j` of scale `si` of sample `i` takes uniforms `2·(i·pn²·dim + j·dim + d)` and the one
/// after it (u0, u1) of stream `2³² + si`, and is `sqrt(−2·log(1 − u0)) · cos(2π·u1)` computed in Double and
/// rounded once to Float. The Double operations are Python's, in the same order; `log1p` and `cos` come from
/// the platform's libm, which may differ from glibc's in the last bit of a Double. The fixture keeps every
/// value far from a Float rounding boundary, so both round to the same Float.
public enum FewStepNoise {
    /// The manifest's `few_step.noise.method`.
    public static let method = "box_muller"
    /// Noise streams start here, after the sampling streams (which are the scale indices).
    public static let streamOffset: UInt64 = 1 << 32

    /// Row-major `(batch, tokens, dim)` normals of scale `scaleIndex` for samples `firstSample ..< firstSample + batch`.
    public static func tokenNoise(seed: UInt64, scaleIndex: Int, firstSample: Int, batch: Int, tokens: Int,
                                  dim: Int) -> [Float] {
        precondition(scaleIndex >= 0 && firstSample >= 0 && batch >= 0 && tokens >= 0 && dim >= 0,
                     "scale index, first sample, batch, tokens and dim must not be negative")
        let stream = SplitMix64Uniforms(seed: seed, stream: streamOffset &+ UInt64(scaleIndex))
        let perSample = UInt64(2 * tokens * dim)  // two uniforms per normal
        let start = UInt64(firstSample) &* perSample
        let twoPi = 2.0 * Double.pi  // Python's `2.0 * math.pi`, one rounding, then times u1
        var out = [Float](repeating: 0, count: batch * tokens * dim)
        for n in out.indices {
            let u0 = Double(stream.uniform(at: start &+ 2 &* UInt64(n)))
            let u1 = Double(stream.uniform(at: start &+ 2 &* UInt64(n) &+ 1))
            let radius = (-2.0 * log1p(-u0)).squareRoot()  // 1 − u0 is in (0, 1]: never log(0)
            out[n] = Float(radius * cos(twoPi * u1))
        }
        return out
    }

    /// Row-major `(batch, L, dim)`: every scale's noise, scales concatenated coarse to fine per sample, as
    /// `few_step.sequence_noise` returns it (the `noise` input of every pass).
    public static func sequence(seed: UInt64, firstSample: Int, batch: Int, patchNums: [Int], dim: Int) -> [Float] {
        let length = patchNums.reduce(0) { $0 + $1 * $1 }
        var out = [Float](repeating: 0, count: batch * length * dim)
        var offset = 0  // first token of the scale within a sample
        for (scale, patch) in patchNums.enumerated() {
            let tokens = patch * patch
            let values = tokenNoise(seed: seed, scaleIndex: scale, firstSample: firstSample, batch: batch,
                                    tokens: tokens, dim: dim)
            let block = tokens * dim
            for sample in 0..<batch {
                let source = sample * block
                let destination = (sample * length + offset) * dim
                out.replaceSubrange(destination..<(destination + block), with: values[source..<(source + block)])
            }
            offset += tokens
        }
        return out
    }
}
