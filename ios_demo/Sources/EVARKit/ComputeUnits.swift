// Compute-unit names as users type them (evar-ios-bench, the app) and as manifests store them.

import Foundation
#if canImport(CoreML)
import CoreML
#endif

/// The processors Core ML may run a model on.
public enum ComputeUnits: String, Codable, CaseIterable, Hashable, Sendable {
    case all
    case cpuOnly
    case cpuAndGPU
    case cpuAndNeuralEngine

    /// Accepts Core ML's spelling (`cpuAndNeuralEngine`) and the manifest's (`cpu_and_ne`).
    public init?(argument: String) {
        switch argument.lowercased().replacingOccurrences(of: "-", with: "_") {
        case "all": self = .all
        case "cpuonly", "cpu_only", "cpu": self = .cpuOnly
        case "cpuandgpu", "cpu_and_gpu", "gpu": self = .cpuAndGPU
        case "cpuandneuralengine", "cpu_and_ne", "cpu_and_neural_engine", "ane", "ne": self = .cpuAndNeuralEngine
        default: return nil
        }
    }

    /// The value `graph.compute_units` uses in a manifest.
    public var manifestName: String {
        switch self {
        case .all: return "all"
        case .cpuOnly: return "cpu_only"
        case .cpuAndGPU: return "cpu_and_gpu"
        case .cpuAndNeuralEngine: return "cpu_and_ne"
        }
    }

    #if canImport(CoreML)
    public var mlComputeUnits: MLComputeUnits {
        switch self {
        case .all: return .all
        case .cpuOnly: return .cpuOnly
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        }
    }
    #endif
}
