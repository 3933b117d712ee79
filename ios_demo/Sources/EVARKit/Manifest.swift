// The artifact manifest, decoded exactly as evar/contract/manifest.schema.json declares it.
//
// Each type below names the schema node it models in a `Schema:` line. tests/test_ios_demo.py reads
// those lines, the CodingKeys and the stored properties with a Swift parser and checks them against
// the schema (same keys, optional exactly where the schema does not require a key, nested types
// matching the nested schema nodes, enum cases equal to the schema's enums), so a schema change
// fails the Python suite until this file follows it.

/// The `manifest.json` of an exported EVAR artifact: the single source of truth for graph files,
/// function inputs/outputs per scale, the KV-cache layout and the sampling policy.
/// Schema: #
public struct Manifest: Codable, Hashable, Sendable {
    public var format: String
    public var formatVersion: Int
    public var backend: Backend?
    public var model: ModelConfig
    public var patchNums: [Int]
    public var imageSize: Int
    public var batch: BatchPolicy?
    /// Keyed by role: `decoder_step`, `vqvae_decoder`.
    public var graphs: [String: Graph]
    public var kvCache: KVCache
    public var sampling: Sampling
    public var precision: Precision
    public var compression: Compression
    public var parity: Parity?
    public var generation: Generation?
    public var provenance: Provenance
    public var files: [FileEntry]

    enum CodingKeys: String, CodingKey {
        case format
        case formatVersion = "format_version"
        case backend
        case model
        case patchNums = "patch_nums"
        case imageSize = "image_size"
        case batch
        case graphs
        case kvCache = "kv_cache"
        case sampling
        case precision
        case compression
        case parity
        case generation
        case provenance
        case files
    }
}

extension Manifest {
    /// Schema: #/properties/backend
    public enum Backend: String, Codable, Hashable, Sendable {
        case onnx
        case coreml
    }

    /// How many samples one call takes.
    /// Schema: #/properties/batch
    public struct BatchPolicy: Codable, Hashable, Sendable {
        public var mode: BatchMode
        public var size: Int?
        /// True: the graph forms the CFG batch (conditional, then unconditional) itself.
        public var cfgDoubled: Bool?

        enum CodingKeys: String, CodingKey {
            case mode
            case size
            case cfgDoubled = "cfg_doubled"
        }
    }

    /// Schema: #/properties/batch/properties/mode
    public enum BatchMode: String, Codable, Hashable, Sendable {
        case dynamic
        case `static`
    }

    /// Numeric precision of weights and compute.
    /// Schema: #/$defs/precision
    public struct Precision: Codable, Hashable, Sendable {
        public var weights: WeightPrecision
        public var compute: ComputePrecision
        /// Ops kept in fp32 under fp16 compute (the sampling tail).
        public var fp32Ops: [String]?

        enum CodingKeys: String, CodingKey {
            case weights
            case compute
            case fp32Ops = "fp32_ops"
        }
    }

    /// Schema: #/$defs/precision/properties/weights
    public enum WeightPrecision: String, Codable, Hashable, Sendable {
        case fp32
        case fp16
        case palettized
        case int8
        case sparse
        case sparsePalettized = "sparse-palettized"
    }

    /// Schema: #/$defs/precision/properties/compute
    public enum ComputePrecision: String, Codable, Hashable, Sendable {
        case fp32
        case fp16
        case int8
    }

    /// Weight compression applied after conversion.
    /// Schema: #/$defs/compression
    public struct Compression: Codable, Hashable, Sendable {
        public var method: CompressionMethod
        public var tool: String?
        public var details: [String: JSONValue]?
    }

    /// Schema: #/$defs/compression/properties/method
    public enum CompressionMethod: String, Codable, Hashable, Sendable {
        case none
        case palettize6
        case palettize4
        case int8
        case sparse24 = "2:4"
        case sparse24Palettize6 = "2:4+palettize6"
        case sparse24Palettize4 = "2:4+palettize4"
    }

    /// What was checked before the artifact was declared complete.
    /// Schema: #/$defs/parity
    public struct Parity: Codable, Hashable, Sendable {
        public var passed: Bool
        public var checks: [ParityCheck]
        public var skipped: [String]?
    }

    /// Schema: #/$defs/parity/properties/checks/items
    public struct ParityCheck: Codable, Hashable, Sendable {
        public var name: String
        public var passed: Bool
        public var metric: String?
        public var value: Double?
        public var tolerance: Double?
        public var detail: String?
    }

    /// Optional generation modes: which graph runs which scale (`Manifest+GenerationModes.swift` follows a split
    /// and CFG trimming, and refuses token pruning).
    /// Schema: #/$defs/generation
    public struct Generation: Codable, Hashable, Sendable {
        /// CFG trimming: scales from this index run the conditional rows only.
        public var cfgUntilScale: Int?
        public var unguidedGraph: String?
        /// Scale split: scales before this index run `earlyGraph` (another model's weights), then `prefillGraph`
        /// builds the step graph's cache (format_version 3).
        public var splitScale: Int?
        public var earlyGraph: String?
        public var prefillGraph: String?
        public var earlyModel: EarlyModel?
        /// Token pruning (format_version 3 as well): keep ratio and static keep count by scale index.
        public var tokenKeep: [String: Double]?
        public var tokenKeepCounts: [String: Int]?
        public var cacheScale: Int?
        public var prunedGraph: String?
        /// Token pruning with CFG trimming: the pruned graph of the conditional rows (refused like token pruning).
        public var prunedUnguidedGraph: String?

        enum CodingKeys: String, CodingKey {
            case cfgUntilScale = "cfg_until_scale"
            case unguidedGraph = "unguided_graph"
            case splitScale = "split_scale"
            case earlyGraph = "early_graph"
            case prefillGraph = "prefill_graph"
            case earlyModel = "early_model"
            case tokenKeep = "token_keep"
            case tokenKeepCounts = "token_keep_counts"
            case cacheScale = "cache_scale"
            case prunedGraph = "pruned_graph"
            case prunedUnguidedGraph = "pruned_unguided_graph"
        }
    }

    /// The early model of a scale split.
    /// Schema: #/$defs/generation/properties/early_model
    public struct EarlyModel: Codable, Hashable, Sendable {
        public var ref: String?
        public var config: [String: JSONValue]?

        enum CodingKeys: String, CodingKey {
            case ref
            case config = "var"
        }
    }

    /// How the artifact was made.
    /// Schema: #/$defs/provenance
    public struct Provenance: Codable, Hashable, Sendable {
        public var modelRef: String
        /// ISO-8601 UTC.
        public var created: String
        public var command: String?
        public var toolVersions: [String: String]
        public var modelProvenance: [String: JSONValue]?

        enum CodingKeys: String, CodingKey {
            case modelRef = "model_ref"
            case created
            case command
            case toolVersions = "tool_versions"
            case modelProvenance = "model_provenance"
        }
    }

    /// One file of the artifact with its size and hash (every file inside an `.mlpackage` is listed).
    /// Schema: #/$defs/file
    public struct FileEntry: Codable, Hashable, Sendable {
        /// Relative to the artifact directory, '/'-separated.
        public var path: String
        public var bytes: Int
        public var sha256: String
    }
}
