// What one generation asks for. Everything that changes the image is here, so a configuration and
// an artifact together reproduce an image exactly (on every backend that follows the manifest).

/// Settings for one image generation with `EVARPipeline`.
///
/// The defaults follow VAR's FID protocol (cfg 1.5); top-k and top-p default to what the artifact was
/// exported with, because graphs that sample in-graph bake them in (`sampling.filters == "baked"`).
public struct GenerationConfiguration: Codable, Hashable, Sendable {
    /// The class to draw, `0 ..< model.var.num_classes` (ImageNet classes for official VAR, digits
    /// 0–9 for `builtin:digits`). The artifact's batch size decides how many images one run makes;
    /// every image of the batch uses this label unless `classLabels` is set.
    public var classLabel: Int

    /// Per-sample labels for artifacts exported with a batch larger than one; overrides `classLabel`.
    public var classLabels: [Int]?

    /// Seed of the `splitmix64-counter-v1` random source. The same seed gives the same tokens as
    /// `evar sample --seed` in Python and as every other EVAR backend.
    public var seed: UInt64

    /// Index of the first sample of this batch within a larger run (`first_sample` in Python), so that
    /// images generated in chunks equal images generated in one batch. Usually 0.
    public var firstSample: Int

    /// Classifier-free guidance scale; ramps linearly from 0 at the first scale to `cfg` at the last.
    /// 0 turns guidance off (identical tokens to Python's unguided path).
    public var cfg: Double

    /// Top-k filter; nil uses the artifact's value. In-graph sampling only accepts the artifact's value.
    public var topK: Int?

    /// Top-p (nucleus) filter in (0, 1]; nil uses the artifact's value. In-graph sampling only accepts
    /// the artifact's value.
    public var topP: Double?

    /// Which processors Core ML may use. Changing it reloads the models on the next generation.
    public var computeUnits: ComputeUnits

    public init(classLabel: Int = 0, classLabels: [Int]? = nil, seed: UInt64 = 0, firstSample: Int = 0,
                cfg: Double = 1.5, topK: Int? = nil, topP: Double? = nil,
                computeUnits: ComputeUnits = .cpuAndNeuralEngine) {
        self.classLabel = classLabel
        self.classLabels = classLabels
        self.seed = seed
        self.firstSample = firstSample
        self.cfg = cfg
        self.topK = topK
        self.topP = topP
        self.computeUnits = computeUnits
    }

    /// `label` moved into `0 ..< numClasses`: a label chosen for one artifact (an ImageNet class, 207)
    /// given to another with fewer classes (digits) becomes its last class instead of failing the run.
    public static func clampedClassLabel(_ label: Int, numClasses: Int) -> Int {
        min(max(label, 0), max(numClasses - 1, 0))
    }

    /// This configuration with its label(s) clamped to an artifact of `numClasses` classes.
    public func clamped(toClasses numClasses: Int) -> GenerationConfiguration {
        var copy = self
        copy.classLabel = Self.clampedClassLabel(classLabel, numClasses: numClasses)
        copy.classLabels = classLabels?.map { Self.clampedClassLabel($0, numClasses: numClasses) }
        return copy
    }

    /// The labels of a batch of `batch` samples.
    public func labels(batch: Int) -> [Int] {
        if let classLabels { return classLabels }
        return [Int](repeating: classLabel, count: batch)
    }
}
