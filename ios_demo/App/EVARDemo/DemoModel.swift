// The app's state: artifacts, the generation settings, the last image, and latency per artifact.

import CoreGraphics
import EVARKit
import Foundation

/// Latency of one artifact on this device, over the runs measured so far.
struct LatencySummary: Hashable {
    var loadMs: Double
    var endToEndMs: [Double] = []
    var decodeMs: [Double] = []
    var scaleMs: [[Double]] = []
    /// Distilled Decoding artifacts: per run, each pass's milliseconds.
    var passMs: [[Double]] = []

    var endToEnd: Statistics? { endToEndMs.isEmpty ? nil : Statistics(endToEndMs) }
    var decode: Statistics? { decodeMs.isEmpty ? nil : Statistics(decodeMs) }

    /// Median per scale.
    var perScaleMedians: [Double] {
        guard let scales = scaleMs.first?.count else { return [] }
        return (0..<scales).map { scale in Statistics(scaleMs.map { $0[scale] }).median }
    }

    /// Median per pass, over the runs of the latest t-list (another t-list has other passes).
    var perPassMedians: [Double] {
        guard let passes = passMs.last?.count else { return [] }
        let runs = passMs.filter { $0.count == passes }
        return (0..<passes).map { pass in Statistics(runs.map { $0[pass] }).median }
    }

    mutating func add(_ timings: StageTimings) {
        endToEndMs.append(timings.endToEndMilliseconds)
        decodeMs.append(timings.decodeMilliseconds)
        scaleMs.append(timings.scaleMilliseconds)
        if let passes = timings.passMilliseconds {
            passMs.append(passes)
        }
    }

    mutating func clearRuns() {
        endToEndMs = []
        decodeMs = []
        scaleMs = []
        passMs = []
    }
}

/// The pipeline of one artifact, of its kind.
enum Runner: Sendable {
    case scaleByScale(EVARPipeline)
    case fewStep(FewStepPipeline)

    init(_ artifact: Artifact, computeUnits: ComputeUnits) throws {
        switch artifact.kind {
        case .scaleByScale:
            self = .scaleByScale(try EVARPipeline(artifactURL: artifact.url, computeUnits: computeUnits))
        case .fewStep:
            self = .fewStep(try FewStepPipeline(artifactURL: artifact.url, computeUnits: computeUnits))
        }
    }

    func setComputeUnits(_ units: ComputeUnits) async {
        switch self {
        case .scaleByScale(let pipeline): await pipeline.setComputeUnits(units)
        case .fewStep(let pipeline): await pipeline.setComputeUnits(units)
        }
    }

    func loadResources() async throws -> Double {
        switch self {
        case .scaleByScale(let pipeline): return try await pipeline.loadResources()
        case .fewStep(let pipeline): return try await pipeline.loadResources()
        }
    }

    /// `tList` applies to Distilled Decoding artifacts (nil: the manifest's default).
    func generate(_ configuration: GenerationConfiguration, tList: [Int]?) async throws -> GenerationResult {
        switch self {
        case .scaleByScale(let pipeline): return try await pipeline.generate(configuration)
        case .fewStep(let pipeline): return try await pipeline.generate(configuration, tList: tList)
        }
    }
}

/// A class the picker offers.
struct ClassChoice: Identifiable, Hashable {
    var label: Int
    var name: String

    var id: Int { label }
}

@MainActor
final class DemoModel: ObservableObject {
    @Published var artifacts: [Artifact] = []
    @Published var selection: Artifact.ID? {
        didSet { clampClassLabel() }  // another artifact may have fewer classes
    }
    @Published var classLabel = 0
    @Published var seed: UInt64 = 0
    @Published var cfg = 1.5
    @Published var computeUnits = ComputeUnits.cpuAndNeuralEngine
    @Published var image: CGImage?
    @Published var status = "Add artifacts to Models/ or import one."
    @Published var isBusy = false
    @Published var latency: [Artifact.ID: LatencySummary] = [:]
    /// Distilled Decoding artifacts: the t-list picked for each (absent: the manifest's default).
    @Published var tLists: [Artifact.ID: [Int]] = [:]

    private var pipelines: [Artifact.ID: Runner] = [:]

    var selected: Artifact? { artifacts.first { $0.id == selection } }

    /// Well-known ImageNet classes (VAR's demo picks) for official models; every class otherwise.
    var classChoices: [ClassChoice] {
        let classes = selected?.model.transformer.numClasses ?? 10
        if classes == 1000 {
            let picks = [(207, "golden retriever"), (360, "otter"), (387, "lesser panda"), (974, "geyser"),
                         (88, "macaw"), (979, "valley"), (417, "balloon"), (279, "arctic fox"), (980, "volcano"),
                         (22, "bald eagle")]
            return picks.map { ClassChoice(label: $0.0, name: $0.1) }
        }
        return (0..<classes).map { ClassChoice(label: $0, name: "class \($0)") }
    }

    func refreshArtifacts() {
        let (found, problems) = ArtifactLibrary.scan()
        artifacts = found
        if selection == nil || !found.contains(where: { $0.id == selection }) {
            selection = found.first?.id
        }
        clampClassLabel()
        status = problems.isEmpty ? "\(found.count) artifact(s)" : problems.joined(separator: "\n")
    }

    func importArtifact(_ result: Result<URL, Error>) {
        do {
            let url = try ArtifactLibrary.importArtifact(from: result.get())
            pipelines[url] = nil
            refreshArtifacts()
            selection = url
        } catch {
            status = "Import failed: \(error.localizedDescription)"
        }
    }

    /// Keeps the picker's label one the selected artifact offers.
    private func clampClassLabel() {
        if let label = classChoices.first?.label, !classChoices.contains(where: { $0.label == classLabel }) {
            classLabel = label
        }
    }

    /// The t-list a Distilled Decoding artifact runs (the picked one, else its default); nil for VAR artifacts.
    func tList(for artifact: Artifact) -> [Int]? {
        tLists[artifact.id] ?? artifact.defaultTList
    }

    /// The settings for one artifact, its label clamped to that artifact's classes: `benchmarkAll` runs
    /// every artifact with the one label the picker shows, which another artifact may not have.
    private func configuration(for artifact: Artifact) -> GenerationConfiguration {
        GenerationConfiguration(classLabel: classLabel, seed: seed, cfg: cfg, computeUnits: computeUnits)
            .clamped(toClasses: artifact.model.transformer.numClasses)
    }

    private func pipeline(for artifact: Artifact) throws -> Runner {
        if let pipeline = pipelines[artifact.id] {
            return pipeline
        }
        let pipeline = try Runner(artifact, computeUnits: computeUnits)
        pipelines[artifact.id] = pipeline
        return pipeline
    }

    /// Loads the artifact's models if needed, recording how long that took.
    private func ensureLoaded(_ artifact: Artifact) async throws -> Runner {
        let pipeline = try pipeline(for: artifact)
        await pipeline.setComputeUnits(computeUnits)
        let loadMs = try await pipeline.loadResources()
        if latency[artifact.id] == nil || loadMs > 1 {
            latency[artifact.id] = LatencySummary(loadMs: loadMs)
        }
        return pipeline
    }

    func generate() async {
        guard let artifact = selected, !isBusy else { return }
        isBusy = true
        defer { isBusy = false }
        do {
            status = "Loading \(artifact.name)…"
            let pipeline = try await ensureLoaded(artifact)
            status = "Generating…"
            let result = try await pipeline.generate(configuration(for: artifact), tList: tList(for: artifact))
            image = result.images.first
            latency[artifact.id, default: LatencySummary(loadMs: 0)].add(result.timings)
            status = String(format: "%@: %.1f ms (class %ld, seed %llu)", artifact.name,
                            result.timings.endToEndMilliseconds, classLabel, seed)
        } catch {
            status = "Failed: \(error.localizedDescription)"
        }
    }

    /// Alternates the artifacts run by run (so thermal state affects all alike): 1 warm-up, then `runs`.
    func benchmarkAll(runs: Int = 5) async {
        guard !isBusy, !artifacts.isEmpty else { return }
        isBusy = true
        defer { isBusy = false }
        do {
            var loaded: [(Artifact, Runner)] = []
            for artifact in artifacts {
                status = "Loading \(artifact.name)…"
                let pipeline = try await ensureLoaded(artifact)
                _ = try await pipeline.generate(configuration(for: artifact), tList: tList(for: artifact))  // warm-up
                latency[artifact.id]?.clearRuns()
                loaded.append((artifact, pipeline))
            }
            for run in 1...runs {
                for (artifact, pipeline) in loaded {
                    status = "Run \(run)/\(runs): \(artifact.name)"
                    let result = try await pipeline.generate(configuration(for: artifact), tList: tList(for: artifact))
                    latency[artifact.id]?.add(result.timings)
                    if artifact.id == selection {
                        image = result.images.first
                    }
                }
            }
            status = "Benchmark done: \(runs) runs per artifact"
        } catch {
            status = "Benchmark failed: \(error.localizedDescription)"
        }
    }

    /// The reference for speed-ups: an artifact named "dense…", else the one with most parameters.
    var baseline: Artifact? {
        artifacts.first { $0.name.lowercased().hasPrefix("dense") }
            ?? artifacts.max { $0.parameterCount < $1.parameterCount }
    }
}
