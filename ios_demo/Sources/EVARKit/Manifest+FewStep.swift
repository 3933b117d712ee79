// The manifest of a Distilled Decoding artifact (`family: dd`, format_version 3), decoded exactly as the schema
// node `#/$defs/dd_manifest` of evar/contract/manifest.schema.json declares it.
//
// A DD artifact has no scale loop: a generation is a chain of student passes (one graph each, given the first
// t scales as data), fed per-token Gaussian noise the host draws (`FewStepNoise`), then the VQVAE decoder.
// As for `Manifest`, every type names its schema node in a `Schema:` line and tests/test_ios_demo.py checks
// keys, optionality, nested types and enum cases against the schema, so a schema change fails the Python suite
// until this file follows it. Sections the two layouts share (model config, precision, compression, parity,
// provenance, files, dimensions, dtypes) reuse `Manifest`'s types.

/// The `manifest.json` of an `evar-export coreml --model DD_DIR` artifact.
/// Schema: #/$defs/dd_manifest
public struct FewStepManifest: Codable, Hashable, Sendable {
    public var format: String
    public var formatVersion: Int
    /// Always `dd`.
    public var family: String
    public var backend: PassBackend?
    public var model: Manifest.ModelConfig
    public var patchNums: [Int]
    public var imageSize: Int
    public var batch: PassBatch?
    /// Keyed by role: one per pass (`few_step.passes[].graph`) and `vqvae_decoder`.
    public var graphs: [String: PassGraph]
    public var fewStep: Plan
    public var precision: Manifest.Precision
    public var compression: Manifest.Compression
    public var parity: Manifest.Parity?
    public var provenance: Manifest.Provenance
    public var files: [Manifest.FileEntry]

    enum CodingKeys: String, CodingKey {
        case format
        case formatVersion = "format_version"
        case family
        case backend
        case model
        case patchNums = "patch_nums"
        case imageSize = "image_size"
        case batch
        case graphs
        case fewStep = "few_step"
        case precision
        case compression
        case parity
        case provenance
        case files
    }
}

extension FewStepManifest {
    /// Schema: #/$defs/dd_manifest/properties/backend
    public enum PassBackend: String, Codable, Hashable, Sendable {
        case onnx
        case coreml
    }

    /// How many samples one call takes; the student has no guidance, so never a doubled batch.
    /// Schema: #/$defs/dd_manifest/properties/batch
    public struct PassBatch: Codable, Hashable, Sendable {
        public var mode: PassBatchMode
        public var size: Int?
        /// Always false.
        public var cfgDoubled: Bool?

        enum CodingKeys: String, CodingKey {
            case mode
            case size
            case cfgDoubled = "cfg_doubled"
        }
    }

    /// Schema: #/$defs/dd_manifest/properties/batch/properties/mode
    public enum PassBatchMode: String, Codable, Hashable, Sendable {
        case dynamic
        case `static`
    }

    /// The chain of passes a generation runs, and the noise they read.
    /// Schema: #/$defs/few_step
    public struct Plan: Codable, Hashable, Sendable {
        /// Every exported pass, by increasing `t`; any increasing t-list from 0 drawn from them runs.
        public var passes: [Pass]
        public var defaultTList: [Int]
        /// Scales from this index take the regression head's vectors (informational: the graphs apply it).
        public var continuousFrom: Int?
        public var noise: Noise
        /// What the tokens are (the argmax of the student's logits).
        public var output: String?

        enum CodingKeys: String, CodingKey {
            case passes
            case defaultTList = "default_t_list"
            case continuousFrom = "continuous_from"
            case noise
            case output
        }
    }

    /// One student pass: given the first `t` scales (`givenTokens` tokens) as data, it decides the rest.
    /// Schema: #/$defs/few_step/properties/passes/items
    public struct Pass: Codable, Hashable, Sendable {
        public var t: Int
        public var givenTokens: Int
        /// The graph role of this pass (a key of `graphs`).
        public var graph: String

        enum CodingKeys: String, CodingKey {
            case t
            case givenTokens = "given_tokens"
            case graph
        }
    }

    /// The noise input: `FewStepNoise.sequence`, Box–Muller on `splitmix64-counter-v1`.
    /// Schema: #/$defs/few_step/properties/noise
    public struct Noise: Codable, Hashable, Sendable {
        public var rng: String
        /// Always `box_muller`.
        public var method: String
        public var input: String
        public var shape: [Manifest.Dimension]
        public var dtype: Manifest.DType
        public var stream: String
    }

    /// One graph file: a pass (a function of the shared multifunction package) or the VQVAE decoder.
    /// Schema: #/$defs/dd_graph
    public struct PassGraph: Codable, Hashable, Sendable {
        public var file: String
        public var format: PassGraphFormat
        public var externalData: String?
        public var opset: Int?
        public var target: String?
        public var computeUnits: PassComputeUnits?
        public var simplified: Bool?
        /// Always null.
        public var signature: JSONValue?
        public var functions: [PassFunction]
        public var defaultFunction: String?
        /// Always null.
        public var scaleSelection: JSONValue?
        public var notes: [String]?

        enum CodingKeys: String, CodingKey {
            case file
            case format
            case externalData = "external_data"
            case opset
            case target
            case computeUnits = "compute_units"
            case simplified
            case signature
            case functions
            case defaultFunction = "default_function"
            case scaleSelection = "scale_selection"
            case notes
        }
    }

    /// Schema: #/$defs/dd_graph/properties/format
    public enum PassGraphFormat: String, Codable, Hashable, Sendable {
        case onnx
        case coreml
    }

    /// Schema: #/$defs/dd_graph/properties/compute_units
    public enum PassComputeUnits: String, Codable, Hashable, Sendable {
        case all
        case cpuAndNE = "cpu_and_ne"
        case cpuAndGPU = "cpu_and_gpu"
        case cpuOnly = "cpu_only"
    }

    /// One callable entry: a pass function (`pass_t0`, ...) or the decoder's `main`.
    /// Schema: #/$defs/dd_graph/properties/functions/items
    public struct PassFunction: Codable, Hashable, Sendable {
        public var name: String
        /// Always null (a pass is not a scale).
        public var scaleIndex: JSONValue?
        public var patchNum: JSONValue?
        /// `[given tokens, L)`: the tokens this pass decides.
        public var tokenRange: [Int]?
        public var inputs: [PassTensor]
        public var outputs: [PassTensor]

        enum CodingKeys: String, CodingKey {
            case name
            case scaleIndex = "scale_index"
            case patchNum = "patch_num"
            case tokenRange = "token_range"
            case inputs
            case outputs
        }
    }

    /// A named tensor of a pass or of the decoder, bound by its role.
    /// Schema: #/$defs/dd_tensor
    public struct PassTensor: Codable, Hashable, Sendable {
        public var name: String
        public var shape: [Manifest.Dimension]
        public var dtype: Manifest.DType
        public var role: PassTensorRole
        public var range: [Double]?
        public var doc: String?
    }

    /// Schema: #/$defs/dd_tensor/properties/role
    public enum PassTensorRole: String, Codable, Hashable, Sendable {
        case labels
        /// `(batch, L, Cvae)` float32 from `FewStepNoise.sequence`.
        case noise
        /// Passes with t > 0: the previous pass's `tokens` / `vectors` (the first `given_tokens` are kept).
        case givenTokens = "given_tokens"
        case givenVectors = "given_vectors"
        /// `(batch, L)` argmax tokens, scales coarse to fine.
        case tokens
        case vectors
        case fHat = "f_hat"
        case image
    }
}
