// Wall-clock timing of one generation, stage by stage.

import Foundation

/// Milliseconds spent in each stage of one `EVARPipeline.generate` call.
public struct StageTimings: Codable, Hashable, Sendable {
    /// Compiling and loading models that were not loaded yet (0 once everything is resident).
    public var loadMilliseconds: Double
    /// One entry per scale: inputs, the decoder-step prediction, outputs (and host sampling if any).
    public var scaleMilliseconds: [Double]
    /// The VQVAE decoder prediction and the conversion to pixels.
    public var decodeMilliseconds: Double
    /// All scales and the decode, without loading.
    public var endToEndMilliseconds: Double
    /// Distilled Decoding artifacts (no scales): one entry per student pass of the t-list, the host's noise
    /// included in the first; nil for VAR artifacts.
    public var passMilliseconds: [Double]?

    public init(loadMilliseconds: Double = 0, scaleMilliseconds: [Double] = [], decodeMilliseconds: Double = 0,
                endToEndMilliseconds: Double = 0, passMilliseconds: [Double]? = nil) {
        self.loadMilliseconds = loadMilliseconds
        self.scaleMilliseconds = scaleMilliseconds
        self.decodeMilliseconds = decodeMilliseconds
        self.endToEndMilliseconds = endToEndMilliseconds
        self.passMilliseconds = passMilliseconds
    }
}

/// A monotonic stopwatch in milliseconds.
public struct Stopwatch {
    private let start: UInt64

    public init() {
        start = DispatchTime.now().uptimeNanoseconds
    }

    public var milliseconds: Double {
        Double(DispatchTime.now().uptimeNanoseconds - start) / 1_000_000
    }
}
