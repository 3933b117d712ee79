// Summary statistics of latency samples, defined as numpy defines them, so that a "median" or
// "p90" from evar-ios-bench means the same as one from evar-bench (Tests/Fixtures/statistics.json).

/// Median, percentiles and extremes of a list of measurements (milliseconds in EVAR).
public struct Statistics: Hashable, Sendable {
    /// The measurements in ascending order.
    public let sorted: [Double]

    public init(_ values: [Double]) {
        precondition(!values.isEmpty, "statistics of no measurements")
        sorted = values.sorted()
    }

    public var median: Double { percentile(50) }
    public var p90: Double { percentile(90) }
    public var min: Double { sorted[0] }
    public var max: Double { sorted[sorted.count - 1] }
    public var mean: Double { sorted.reduce(0, +) / Double(sorted.count) }

    /// `numpy.percentile(values, q)` with its default linear interpolation between closest ranks.
    public func percentile(_ q: Double) -> Double {
        precondition(q >= 0 && q <= 100, "percentile must be in [0, 100]")
        let rank = q / 100 * Double(sorted.count - 1)
        let below = Int(rank.rounded(.down))
        let above = Swift.min(below + 1, sorted.count - 1)
        let fraction = rank - Double(below)
        let a = sorted[below]
        let b = sorted[above]
        let difference = b - a
        // numpy interpolates from the nearer end, which decides the last bit of the result.
        return fraction >= 0.5 ? b - difference * (1 - fraction) : a + difference * fraction
    }
}
