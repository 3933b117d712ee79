// KV-cache layout and sampling policy of an artifact.

extension Manifest {
    /// Where the KV cache lives between scales and how it is laid out.
    /// Schema: #/$defs/kv_cache
    public struct KVCache: Codable, Hashable, Sendable {
        /// `io`: past in, present out; `state`: Core ML state buffers written in place (iOS 18).
        public var mode: KVMode
        public var layout: KVLayout
        /// Axis meanings, e.g. `[cfg_batch, heads, sequence, head_dim]`.
        public var dims: [String]
        public var dtype: DType?
        /// The KV batch in terms of the sample batch, e.g. `2*batch` with in-graph CFG.
        public var batch: String?
        /// L = Σ pn²; state buffers have this length.
        public var maxLength: Int
        /// ANE layout: the state's sequence length, L rounded up to a multiple of 32 (masked past each scale).
        public var paddedLength: Int?
        /// Axis meanings of the value cache when they differ from `dims` (the key cache's).
        public var valueDims: [String]?
        public var headDim: Int
        public var initial: String?
        public var layers: [KVLayer]

        enum CodingKeys: String, CodingKey {
            case mode
            case layout
            case dims
            case dtype
            case batch
            case maxLength = "max_length"
            case paddedLength = "padded_length"
            case valueDims = "value_dims"
            case headDim = "head_dim"
            case initial
            case layers
        }
    }

    /// Schema: #/$defs/kv_cache/properties/mode
    public enum KVMode: String, Codable, Hashable, Sendable {
        case io
        case state
    }

    /// Schema: #/$defs/kv_cache/properties/layout
    public enum KVLayout: String, Codable, Hashable, Sendable {
        case perLayer = "per_layer"
        case stacked
    }

    /// One transformer block's cache: head count (pruning changes it) and tensor names.
    /// Schema: #/$defs/kv_cache/properties/layers/items
    public struct KVLayer: Codable, Hashable, Sendable {
        public var index: Int
        public var heads: Int
        public var pastKey: String?
        public var pastValue: String?
        public var presentKey: String?
        public var presentValue: String?
        public var stateKey: String?
        public var stateValue: String?

        enum CodingKeys: String, CodingKey {
            case index
            case heads
            case pastKey = "past_key"
            case pastValue = "past_value"
            case presentKey = "present_key"
            case presentValue = "present_value"
            case stateKey = "state_key"
            case stateValue = "state_value"
        }
    }

    /// How tokens are drawn: the random source, the filters, guidance and where sampling runs.
    /// Schema: #/$defs/sampling
    public struct Sampling: Codable, Hashable, Sendable {
        /// The random source, `splitmix64-counter-v1` (`SplitMix64Uniforms.name`).
        public var rng: String
        /// Always `inverse_cdf`.
        public var method: String
        public var inGraph: Bool
        /// `host`: the step functions return raw logits and the runtime samples, then runs `fhat_update`;
        /// nil: `graph` when `inGraph`.
        public var `where`: SamplingLocation?
        /// Baked into the graph (0 = off).
        public var topK: Int
        /// Baked into the graph (0 = off).
        public var topP: Double
        public var filters: SamplingFilters?
        public var cfg: Guidance
        public var uniforms: Uniforms

        enum CodingKeys: String, CodingKey {
            case rng
            case method
            case inGraph = "in_graph"
            case `where`
            case topK = "top_k"
            case topP = "top_p"
            case filters
            case cfg
            case uniforms
        }
    }

    /// Where tokens are drawn.
    /// Schema: #/$defs/sampling/properties/where
    public enum SamplingLocation: String, Codable, Hashable, Sendable {
        case graph
        case host
    }

    /// Schema: #/$defs/sampling/properties/filters
    public enum SamplingFilters: String, Codable, Hashable, Sendable {
        case baked
        /// Host-sampled artifacts: `top_k` / `top_p` are defaults; a generation may ask for others.
        case host
    }

    /// The guidance-scale input and its ramp.
    /// Schema: #/$defs/sampling/properties/cfg
    public struct Guidance: Codable, Hashable, Sendable {
        /// Name of the guidance-scale input (shape [1], float32).
        public var input: String
        public var ramp: String
        public var `default`: Double?
        public var unconditionalLabel: Int?

        enum CodingKeys: String, CodingKey {
            case input
            case ramp
            case `default`
            case unconditionalLabel = "unconditional_label"
        }
    }

    /// The uniforms input and how to draw it.
    /// Schema: #/$defs/sampling/properties/uniforms
    public struct Uniforms: Codable, Hashable, Sendable {
        public var input: String
        public var shape: [Dimension]
        public var dtype: DType
        public var stream: String
    }
}
