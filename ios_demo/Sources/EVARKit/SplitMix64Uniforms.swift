// The portable random source of EVAR, `splitmix64-counter-v1`, ported from evar/rng.py.
//
// Sampling consumes explicit uniforms instead of a framework generator, so PyTorch, onnxruntime,
// Core ML graphs and this package draw the same tokens for the same seed. Every operation below is
// wrapping UInt64 arithmetic (`&+`, `&*`), exactly as the numpy reference; Tests/Fixtures/rng.json
// holds the reference outputs.

/// Counter-based uniforms in [0, 1) with 24 random bits each (exact in `Float`).
///
/// Number `i` of stream `(seed, stream)` is `(splitmix(key &+ i) >> 40) · 2⁻²⁴` with
/// `key = splitmix(splitmix(seed) ^ stream)`. Being counter based, any slice can be drawn directly,
/// which is how a sample's tokens stay independent of the batch it was generated in.
public struct SplitMix64Uniforms: Hashable, Sendable {
    /// The name manifests use for this algorithm (`sampling.rng`).
    public static let name = "splitmix64-counter-v1"

    @usableFromInline static let golden: UInt64 = 0x9E37_79B9_7F4A_7C15
    @usableFromInline static let multiplier1: UInt64 = 0xBF58_476D_1CE4_E5B9
    @usableFromInline static let multiplier2: UInt64 = 0x94D0_49BB_1331_11EB

    /// The stream key, `splitmix(splitmix(seed) ^ stream)`.
    public let key: UInt64

    /// The uniforms of one stream; EVAR uses the scale index as the stream.
    public init(seed: UInt64, stream: UInt64) {
        key = Self.splitmix(Self.splitmix(seed) ^ stream)
    }

    /// SplitMix64's output function (the finaliser).
    @inlinable
    public static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* multiplier1
        z = (z ^ (z >> 27)) &* multiplier2
        return z ^ (z >> 31)
    }

    /// One SplitMix64 step from state `x`: `mix(x &+ golden)`.
    @inlinable
    public static func splitmix(_ x: UInt64) -> UInt64 {
        mix(x &+ golden)
    }

    /// The full 64-bit output behind uniform number `index` (before the top 24 bits are kept).
    @inlinable
    public func rawBits(at index: UInt64) -> UInt64 {
        Self.splitmix(key &+ index)
    }

    /// Uniform number `index` of this stream, in [0, 1).
    @inlinable
    public func uniform(at index: UInt64) -> Float {
        // 24 bits convert to Float exactly, and the power-of-two scale is exact too.
        Float(rawBits(at: index) >> 40) * 0x1p-24
    }

    /// Uniforms `start ..< start + count` of this stream.
    public func uniforms(count: Int, start: UInt64 = 0) -> [Float] {
        precondition(count >= 0, "count must not be negative")
        var values = [Float](repeating: 0, count: count)
        for i in 0..<count {
            values[i] = uniform(at: start &+ UInt64(i))
        }
        return values
    }

    /// The uniforms of one scale, row-major (batch, tokens): token `j` of sample `b` takes number
    /// `(firstSample + b) · tokens + j` of stream `scaleIndex`, as `evar.rng.scale_uniforms` does.
    public static func scaleUniforms(seed: UInt64, scaleIndex: Int, batch: Int, tokens: Int,
                                     firstSample: Int = 0) -> [Float] {
        precondition(scaleIndex >= 0 && batch >= 0 && tokens >= 0 && firstSample >= 0,
                     "scale index, batch, tokens and first sample must not be negative")
        let stream = SplitMix64Uniforms(seed: seed, stream: UInt64(scaleIndex))
        return stream.uniforms(count: batch * tokens, start: UInt64(firstSample) &* UInt64(tokens))
    }
}
