// The JSON that evar-ios-bench prints. Its fields are the ones `evar-bench` prints (ios_demo/README.md,
// "Bench JSON"), so on-device numbers drop into the same benchmark tables and plots.

import Foundation

/// Latency of one artifact on one device: per scale, VQVAE decode and end to end, over timed runs.
public struct BenchReport: Codable, Hashable, Sendable {
    /// Median and 90th percentile of one stage.
    public struct Summary: Codable, Hashable, Sendable {
        public var medianMs: Double
        public var p90Ms: Double

        enum CodingKeys: String, CodingKey {
            case medianMs = "median_ms"
            case p90Ms = "p90_ms"
        }
    }

    /// One scale's latency.
    public struct ScaleSummary: Codable, Hashable, Sendable {
        public var scaleIndex: Int
        public var patchNum: Int
        public var medianMs: Double
        public var p90Ms: Double

        enum CodingKeys: String, CodingKey {
            case scaleIndex = "scale_index"
            case patchNum = "patch_num"
            case medianMs = "median_ms"
            case p90Ms = "p90_ms"
        }
    }

    /// End-to-end latency (all scales and the decode, models already loaded).
    public struct EndToEnd: Codable, Hashable, Sendable {
        public var medianMs: Double
        public var p90Ms: Double
        public var minMs: Double

        enum CodingKeys: String, CodingKey {
            case medianMs = "median_ms"
            case p90Ms = "p90_ms"
            case minMs = "min_ms"
        }
    }

    /// One student pass of a Distilled Decoding run.
    public struct PassSummary: Codable, Hashable, Sendable {
        /// Scales given to the pass as data (0: the first pass, all noise).
        public var t: Int
        /// The pass's graph role.
        public var graph: String
        public var medianMs: Double
        public var p90Ms: Double

        enum CodingKeys: String, CodingKey {
            case t
            case graph
            case medianMs = "median_ms"
            case p90Ms = "p90_ms"
        }
    }

    /// Distilled Decoding artifacts: the t-list that ran and each pass's latency (a DD run has no scales).
    public struct FewStepSummary: Codable, Hashable, Sendable {
        public var tList: [Int]
        /// One entry per pass of `tList`; the host's noise is timed with the first.
        public var perPass: [PassSummary]

        enum CodingKeys: String, CodingKey {
            case tList = "t_list"
            case perPass = "per_pass"
        }
    }

    /// `evar-bench-v1`.
    public var format: String
    /// The program that measured: `evar-ios-bench`, the app (`EVARDemo`) or `evar-bench`.
    public var tool: String
    /// Hardware model and chip, e.g. `iPad16,3` or `Mac14,2 (Apple M2)`.
    public var device: String
    /// Operating system and version.
    public var os: String
    /// `coreml` for EVARKit.
    public var backend: String
    /// Core ML compute units (`cpuAndNeuralEngine`, ...).
    public var computeUnits: String
    /// Intra-op threads; nil where the runtime chooses them (Core ML).
    public var threads: Int?
    /// Compute precision of the artifact (`fp16` / `fp32`).
    public var precision: String
    /// Weight storage (`fp16`, `palettized`, ...).
    public var weights: String
    /// Weight compression method of the artifact.
    public var compression: String
    /// Samples per generation.
    public var batch: Int
    public var cfg: Double
    public var topK: Int
    public var topP: Double
    public var seed: UInt64
    /// `graph` (in-graph sampling) or `host`.
    public var sampling: String
    /// `state` (Core ML state) or `io` (KV as inputs/outputs).
    public var kvCache: String
    /// Untimed runs before measuring.
    public var warmup: Int
    /// Timed runs.
    public var iterations: Int
    /// Compiling (first time only) and loading every function, once, before the warm-up.
    public var loadMs: Double
    public var perScale: [ScaleSummary]
    public var decode: Summary
    public var endToEnd: EndToEnd
    /// Images per second at the median end-to-end latency.
    public var throughputImagesPerS: Double
    /// Parameters of the VAR transformer (VQVAE excluded).
    public var params: Int
    /// The artifact directory's name.
    public var artifact: String
    /// `provenance.model_ref` of the artifact.
    public var modelRef: String
    /// Host-sampled artifacts: the units each stage ran on (`decoder_step`, `fhat_update`, `vqvae_decoder`:
    /// a compute-units name; `sampling`: `host`); null otherwise.
    public var stageUnits: [String: String]?
    /// Distilled Decoding artifacts: the t-list and per-pass latency (`per_scale` is then empty); null otherwise.
    public var fewStep: FewStepSummary?

    enum CodingKeys: String, CodingKey {
        case format
        case tool
        case device
        case os
        case backend
        case computeUnits = "compute_units"
        case threads
        case precision
        case weights
        case compression
        case batch
        case cfg
        case topK = "top_k"
        case topP = "top_p"
        case seed
        case sampling
        case kvCache = "kv_cache"
        case warmup
        case iterations
        case loadMs = "load_ms"
        case perScale = "per_scale"
        case decode
        case endToEnd = "end_to_end"
        case throughputImagesPerS = "throughput_images_per_s"
        case params
        case artifact
        case modelRef = "model_ref"
        case stageUnits = "stage_units"
        case fewStep = "few_step"
    }

    public static let formatName = "evar-bench-v1"

    /// Summarises timed runs (warm-up runs excluded by the caller).
    public init(manifest: Manifest, artifactName: String, configuration: GenerationConfiguration,
                runs: [StageTimings], warmup: Int, loadMs: Double, tool: String,
                device: String = DeviceInfo.model, os: String = DeviceInfo.operatingSystem) {
        precondition(!runs.isEmpty, "a report needs at least one timed run")
        format = Self.formatName
        self.tool = tool
        self.device = device
        self.os = os
        backend = "coreml"
        computeUnits = configuration.computeUnits.rawValue
        threads = nil
        precision = manifest.precision.compute.rawValue
        weights = manifest.precision.weights.rawValue
        compression = manifest.compression.method.rawValue
        batch = manifest.batchSize
        cfg = configuration.cfg
        topK = configuration.topK ?? manifest.sampling.topK
        topP = configuration.topP ?? manifest.sampling.topP
        seed = configuration.seed
        sampling = manifest.samplesOnHost ? "host" : "graph"
        kvCache = manifest.kvCache.mode.rawValue
        self.warmup = warmup
        iterations = runs.count
        self.loadMs = loadMs
        perScale = manifest.patchNums.enumerated().map { (scale, patch) -> ScaleSummary in
            let stats = Statistics(runs.map { $0.scaleMilliseconds[scale] })
            return ScaleSummary(scaleIndex: scale, patchNum: patch, medianMs: stats.median, p90Ms: stats.p90)
        }
        let decodeStats = Statistics(runs.map { $0.decodeMilliseconds })
        decode = Summary(medianMs: decodeStats.median, p90Ms: decodeStats.p90)
        let total = Statistics(runs.map { $0.endToEndMilliseconds })
        endToEnd = EndToEnd(medianMs: total.median, p90Ms: total.p90, minMs: total.min)
        throughputImagesPerS = total.median > 0 ? Double(manifest.batchSize) * 1000 / total.median : 0
        params = manifest.model.transformer.parameterCount
        artifact = artifactName
        modelRef = manifest.provenance.modelRef
        stageUnits = manifest.stageUnits(configuration.computeUnits)
        fewStep = nil
    }

    /// Summarises timed runs of a Distilled Decoding artifact: `per_scale` empty, the passes in `few_step`,
    /// no guidance or filters (`cfg`, `top_k`, `top_p` 0), sampling `graph` (the argmax is in the graph),
    /// `kv_cache` `none`, `params` the student's.
    public init(fewStep manifest: FewStepManifest, tList: [Int], artifactName: String,
                configuration: GenerationConfiguration, runs: [StageTimings], warmup: Int, loadMs: Double,
                tool: String, device: String = DeviceInfo.model, os: String = DeviceInfo.operatingSystem) throws {
        precondition(!runs.isEmpty, "a report needs at least one timed run")
        let passes = try manifest.passes(tList: tList)
        format = Self.formatName
        self.tool = tool
        self.device = device
        self.os = os
        backend = "coreml"
        computeUnits = configuration.computeUnits.rawValue
        threads = nil
        precision = manifest.precision.compute.rawValue
        weights = manifest.precision.weights.rawValue
        compression = manifest.compression.method.rawValue
        batch = manifest.batchSize
        cfg = 0
        topK = 0
        topP = 0
        seed = configuration.seed
        sampling = "graph"
        kvCache = "none"
        self.warmup = warmup
        iterations = runs.count
        self.loadMs = loadMs
        perScale = []
        let perPass = try passes.enumerated().map { (index, pass) -> PassSummary in
            let times = try runs.map { run -> Double in
                guard let measured = run.passMilliseconds, measured.count == tList.count else {
                    throw EVARError.invalidConfiguration("a timed run of another t-list than \(tList)")
                }
                return measured[index]
            }
            let stats = Statistics(times)
            return PassSummary(t: pass.t, graph: pass.graph, medianMs: stats.median, p90Ms: stats.p90)
        }
        let decodeStats = Statistics(runs.map { $0.decodeMilliseconds })
        decode = Summary(medianMs: decodeStats.median, p90Ms: decodeStats.p90)
        let total = Statistics(runs.map { $0.endToEndMilliseconds })
        endToEnd = EndToEnd(medianMs: total.median, p90Ms: total.p90, minMs: total.min)
        throughputImagesPerS = total.median > 0 ? Double(manifest.batchSize) * 1000 / total.median : 0
        params = manifest.studentParameterCount
        artifact = artifactName
        modelRef = manifest.provenance.modelRef
        stageUnits = nil
        fewStep = FewStepSummary(tList: tList, perPass: perPass)
    }

    /// Every key, optional ones as `null`: the bench JSON contract (ios_demo/README.md, "Bench JSON") has
    /// `"threads": null` where the runtime schedules its own threads, as `evar-bench` writes it. The
    /// synthesized encoder would leave nil keys out instead (Tests/Fixtures/bench_nulls.json pins this).
    public func encode(to encoder: Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(format, forKey: .format)
        try container.encode(tool, forKey: .tool)
        try container.encode(device, forKey: .device)
        try container.encode(os, forKey: .os)
        try container.encode(backend, forKey: .backend)
        try container.encode(computeUnits, forKey: .computeUnits)
        if let threads {
            try container.encode(threads, forKey: .threads)
        } else {
            try container.encodeNil(forKey: .threads)
        }
        try container.encode(precision, forKey: .precision)
        try container.encode(weights, forKey: .weights)
        try container.encode(compression, forKey: .compression)
        try container.encode(batch, forKey: .batch)
        try container.encode(cfg, forKey: .cfg)
        try container.encode(topK, forKey: .topK)
        try container.encode(topP, forKey: .topP)
        try container.encode(seed, forKey: .seed)
        try container.encode(sampling, forKey: .sampling)
        try container.encode(kvCache, forKey: .kvCache)
        try container.encode(warmup, forKey: .warmup)
        try container.encode(iterations, forKey: .iterations)
        try container.encode(loadMs, forKey: .loadMs)
        try container.encode(perScale, forKey: .perScale)
        try container.encode(decode, forKey: .decode)
        try container.encode(endToEnd, forKey: .endToEnd)
        try container.encode(throughputImagesPerS, forKey: .throughputImagesPerS)
        try container.encode(params, forKey: .params)
        try container.encode(artifact, forKey: .artifact)
        try container.encode(modelRef, forKey: .modelRef)
        if let stageUnits {
            try container.encode(stageUnits, forKey: .stageUnits)
        } else {
            try container.encodeNil(forKey: .stageUnits)
        }
        if let fewStep {
            try container.encode(fewStep, forKey: .fewStep)
        } else {
            try container.encodeNil(forKey: .fewStep)
        }
    }

    /// Pretty-printed JSON with sorted keys, as written to `--json`.
    public func jsonData() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }
}
