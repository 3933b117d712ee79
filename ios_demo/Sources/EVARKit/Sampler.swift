// Host-side token sampling, the same decisions as evar/models/sampling.py.
//
// Used when an artifact samples outside the graph, and to check a graph's own sampling
// (`EVARPipeline.Options.verifySampling`). Precision mirrors the PyTorch reference: logits and
// probabilities are Float, running sums are accumulated in Double and stored as Float (PyTorch's CPU
// cumsum does the same), thresholds are Float. Tests/Fixtures/sampling.json holds reference cases.

import Foundation

/// Classifier-free guidance, top-k / top-p filtering and inverse-CDF draws from explicit uniforms.
public struct Sampler: Hashable, Sendable {
    /// Keep the `topK` largest logits (ties with the k-th largest included); 0 or ≥ vocabulary: off.
    public var topK: Int
    /// Drop the least likely tokens whose total probability is at most `1 - topP`; 0: off.
    public var topP: Double

    public init(topK: Int = 0, topP: Double = 0) {
        self.topK = topK
        self.topP = topP
    }

    // MARK: Guidance

    /// VAR's linear guidance ramp: no guidance at the first scale, full `cfg` at the last.
    public static func guidanceRatio(cfg: Double, scaleIndex: Int, numScales: Int) -> Double {
        cfg * Double(scaleIndex) / Double(max(numScales - 1, 1))
    }

    /// `(1 + t)·cond − t·uncond`, each operation rounded to Float as PyTorch does with a Python scalar.
    public static func applyGuidance(cond: [Float], uncond: [Float], ratio t: Double) -> [Float] {
        precondition(cond.count == uncond.count, "conditional and unconditional logits differ in size")
        let a = Float(1 + t)
        let b = Float(t)
        var out = [Float](repeating: 0, count: cond.count)
        for i in 0..<cond.count {
            let scaledCond = a * cond[i]
            let scaledUncond = b * uncond[i]
            out[i] = scaledCond - scaledUncond
        }
        return out
    }

    // MARK: Filtering

    /// Which tokens survive top-k and then top-p, in vocabulary order.
    public func keptMask(logits: [Float]) -> [Bool] {
        var mask = [Bool](repeating: false, count: logits.count)
        for index in keptIndices(logits: logits) {
            mask[index] = true
        }
        return mask
    }

    /// The surviving token indices in ascending index order.
    public func keptIndices(logits: [Float]) -> [Int] {
        let vocab = logits.count
        precondition(vocab > 0, "empty logits")
        var kept = Array(0..<vocab)
        if topK > 0 && topK < vocab {
            let kthLargest = logits.sorted(by: >)[topK - 1]
            kept = kept.filter { logits[$0] >= kthLargest }
        }
        if topP > 0 {
            kept = applyTopP(logits: logits, candidates: kept)
        }
        return kept
    }

    /// Drops the ascending low tail whose softmax mass is at most `1 - topP`; the largest always stays.
    private func applyTopP(logits: [Float], candidates: [Int]) -> [Int] {
        // Ascending by logit; ties by index, so the choice among equal logits is deterministic.
        let ascending = candidates.sorted { (logits[$0], $0) < (logits[$1], $1) }
        let probabilities = Self.softmax(ascending.map { logits[$0] })
        let cut = Float(1 - topP)
        var dropped = Set<Int>()
        var running = 0.0
        for (position, index) in ascending.enumerated() where position < ascending.count - 1 {
            running += Double(probabilities[position])
            if Float(running) <= cut {
                dropped.insert(index)
            }
        }
        return candidates.filter { !dropped.contains($0) }
    }

    /// Softmax in Float with a Double denominator.
    static func softmax(_ logits: [Float]) -> [Float] {
        guard let maximum = logits.max() else { return [] }
        let exps = logits.map { exp(Double($0 - maximum)) }
        let total = exps.reduce(0, +)
        return exps.map { Float($0 / total) }
    }

    // MARK: Condition rows

    /// Row-major `(2·batch, unconditional + 1)` one-hot rows, the `class_onehot` input of a host-sampled
    /// step: rows `[0, batch)` the labels, rows `[batch, 2·batch)` the unconditional class (the last column),
    /// as `evar.contract.host_sampling.class_onehot` builds them.
    public static func classOnehot(labels: [Int], unconditional: Int) -> [Float] {
        let width = unconditional + 1
        let rows = labels + [Int](repeating: unconditional, count: labels.count)
        var out = [Float](repeating: 0, count: rows.count * width)
        for (row, label) in rows.enumerated() {
            precondition(label >= 0 && label < width, "class \(label) is outside 0..<\(width)")
            out[row * width + label] = 1
        }
        return out
    }

    // MARK: Drawing

    /// The inverse-CDF draw: the number of cumulative probabilities `≤ u · total`, clamped to V − 1.
    ///
    /// Filtered-out tokens carry no mass, so the threshold never lands on them.
    public func sample(logits: [Float], uniform u: Float) -> Int {
        let kept = keptIndices(logits: logits)
        let probabilities = Self.softmax(kept.map { logits[$0] })
        var cdf = [Float](repeating: 0, count: kept.count)
        var running = 0.0
        for i in 0..<kept.count {
            running += Double(probabilities[i])
            cdf[i] = Float(running)
        }
        let threshold = u * (cdf.last ?? 0)
        // cdf is non-decreasing: the first kept token whose cdf exceeds the threshold is the draw.
        for i in 0..<kept.count where cdf[i] > threshold {
            return kept[i]
        }
        return logits.count - 1
    }

    /// Tokens for one scale, as EVARPipeline samples on the host.
    ///
    /// - Parameters:
    ///   - logits: row-major `(rows, tokens, vocab)`; with guidance `rows = 2·batch`, the conditional
    ///     samples first, otherwise `rows = batch`.
    ///   - uniforms: row-major `(batch, tokens)`, from `SplitMix64Uniforms.scaleUniforms`.
    ///   - guidanceRatio: `t` of this scale, or nil without guidance.
    /// - Returns: row-major `(batch, tokens)` token indices.
    public func sampleScale(logits: [Float], batch: Int, tokens: Int, vocab: Int, guidanceRatio: Double?,
                            uniforms: [Float]) -> [Int32] {
        let rows = guidanceRatio == nil ? batch : 2 * batch
        precondition(logits.count == rows * tokens * vocab, "logits do not have \(rows)×\(tokens)×\(vocab) values")
        precondition(uniforms.count == batch * tokens, "need \(batch)×\(tokens) uniforms")
        var out = [Int32](repeating: 0, count: batch * tokens)
        for b in 0..<batch {
            for j in 0..<tokens {
                let condStart = (b * tokens + j) * vocab
                var row = Array(logits[condStart..<(condStart + vocab)])
                if let t = guidanceRatio {
                    let uncondStart = ((batch + b) * tokens + j) * vocab
                    row = Self.applyGuidance(cond: row, uncond: Array(logits[uncondStart..<(uncondStart + vocab)]),
                                             ratio: t)
                }
                out[b * tokens + j] = Int32(sample(logits: row, uniform: uniforms[b * tokens + j]))
            }
        }
        return out
    }
}
