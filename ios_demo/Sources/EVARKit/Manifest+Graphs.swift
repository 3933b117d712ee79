// Graphs, their functions and tensors, as the manifest declares them.

extension Manifest {
    /// One graph file (a `.mlpackage` for Core ML) with its callable functions.
    /// Schema: #/$defs/graph
    public struct Graph: Codable, Hashable, Sendable {
        /// Relative to the artifact directory (`.onnx` file or `.mlpackage` directory).
        public var file: String
        public var format: GraphFormat
        public var externalData: String?
        public var opset: Int?
        /// Core ML minimum deployment target, e.g. `iOS18`.
        public var target: String?
        public var computeUnits: GraphComputeUnits?
        public var simplified: Bool?
        public var signature: Signature?
        public var functions: [Function]
        public var defaultFunction: String?
        /// `function` (one Core ML function per scale) or `scale_index_input` (ONNX).
        public var scaleSelection: String?
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

    /// Schema: #/$defs/graph/properties/format
    public enum GraphFormat: String, Codable, Hashable, Sendable {
        case onnx
        case coreml
    }

    /// The compute units a graph was exported for (a hint; the app chooses its own).
    /// Schema: #/$defs/graph/properties/compute_units
    public enum GraphComputeUnits: String, Codable, Hashable, Sendable {
        case all
        case cpuAndNE = "cpu_and_ne"
        case cpuAndGPU = "cpu_and_gpu"
        case cpuOnly = "cpu_only"
    }

    /// ONNX: the graph's own inputs/outputs with symbolic dims.
    /// Schema: #/$defs/graph/properties/signature
    public struct Signature: Codable, Hashable, Sendable {
        public var inputs: [Tensor]
        public var outputs: [Tensor]
    }

    /// One callable entry: a Core ML function (one per scale for the decoder step).
    /// Schema: #/$defs/function
    public struct Function: Codable, Hashable, Sendable {
        public var name: String
        public var scaleIndex: Int?
        public var patchNum: Int?
        /// `[begin, end)` of this scale in the flattened sequence; `begin` is the past length.
        public var tokenRange: [Int]?
        public var inputs: [Tensor]
        public var outputs: [Tensor]
        /// Core ML model state (the iOS 18 KV cache).
        public var states: [Tensor]?
        /// iOS 17 artifacts: this function's own single-function package (relative to the artifact);
        /// nil: the graph's `file`.
        public var file: String?

        enum CodingKeys: String, CodingKey {
            case name
            case scaleIndex = "scale_index"
            case patchNum = "patch_num"
            case tokenRange = "token_range"
            case inputs
            case outputs
            case states
            case file
        }
    }

    /// A named tensor with its shape, element type and meaning.
    /// Schema: #/$defs/tensor
    public struct Tensor: Codable, Hashable, Sendable {
        public var name: String
        public var shape: [Dimension]
        public var dtype: DType
        /// What the tensor means, so a runtime binds it without parsing names.
        public var role: TensorRole?
        /// KV tensors: the transformer block.
        public var layer: Int?
        /// Value range, e.g. `[-1, 1]` for images.
        public var range: [Double]?
        public var doc: String?
    }

    /// Schema: #/$defs/dtype
    public enum DType: String, Codable, Hashable, Sendable {
        case float32
        case float16
        case int64
        case int32
        case bool
    }

    /// Schema: #/$defs/tensor/properties/role
    public enum TensorRole: String, Codable, Hashable, Sendable {
        case labels
        case fHat = "f_hat"
        case uniforms
        case cfg
        case scaleIndex = "scale_index"
        case pastKey = "past_key"
        case pastValue = "past_value"
        case logits
        case idx
        case presentKey = "present_key"
        case presentValue = "present_value"
        case keyCache = "key_cache"
        case valueCache = "value_cache"
        case image
        /// Host-sampled artifacts: `(2·batch, classes + 1)` one-hot rows, conditional then unconditional.
        case classOnehot = "class_onehot"
        /// Host-sampled artifacts: logits before guidance, `(2·batch, pn², V)`, conditional rows first.
        case rawLogits = "raw_logits"
        /// Token pruning (ONNX `decoder_step_pruned`; EVARKit does not run it): K, the previous scale's update map (final hidden − input), this scale's.
        case keepCount = "keep_count"
        case cachedHidden = "cached_hidden"
        case hidden
    }

    /// A static size or a symbol (`batch`, `cfg_batch`, `sequence_length`, `past_sequence_length`,
    /// `total_sequence_length`).
    /// Schema: #/$defs/dim
    public enum Dimension: Codable, Hashable, Sendable, CustomStringConvertible {
        case size(Int)
        case symbol(String)

        public init(from decoder: Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let size = try? container.decode(Int.self) {
                self = .size(size)
            } else {
                self = .symbol(try container.decode(String.self))
            }
        }

        public func encode(to encoder: Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .size(let size): try container.encode(size)
            case .symbol(let symbol): try container.encode(symbol)
            }
        }

        public var description: String {
            switch self {
            case .size(let size): return String(size)
            case .symbol(let symbol): return symbol
            }
        }
    }
}
