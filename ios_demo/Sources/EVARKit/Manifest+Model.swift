// The model config embedded in a manifest (Python's ModelConfig.to_dict()).

extension Manifest {
    /// Schema: #/$defs/model_config
    public struct ModelConfig: Codable, Hashable, Sendable {
        /// The VAR transformer (`var` in JSON).
        public var transformer: VARConfig
        public var vqvae: VQVAEConfig
        public var provenance: [String: JSONValue]

        enum CodingKeys: String, CodingKey {
            case transformer = "var"
            case vqvae
            case provenance
        }
    }

    /// Per-block head counts and FFN widths: a pruned model is described by these alone.
    /// Schema: #/$defs/model_config/properties/var
    public struct VARConfig: Codable, Hashable, Sendable {
        public var depth: Int
        public var embedDim: Int
        public var numHeads: [Int]
        public var ffnDims: [Int]
        public var headDim: Int
        public var vocabSize: Int
        public var cvae: Int
        /// Label `numClasses` is the unconditional class.
        public var numClasses: Int
        public var patchNums: [Int]
        public var normEps: Double
        public var attnL2Norm: Bool
        public var sharedAln: Bool
        public var condDropRate: Double

        enum CodingKeys: String, CodingKey {
            case depth
            case embedDim = "embed_dim"
            case numHeads = "num_heads"
            case ffnDims = "ffn_dims"
            case headDim = "head_dim"
            case vocabSize = "vocab_size"
            case cvae
            case numClasses = "num_classes"
            case patchNums = "patch_nums"
            case normEps = "norm_eps"
            case attnL2Norm = "attn_l2_norm"
            case sharedAln = "shared_aln"
            case condDropRate = "cond_drop_rate"
        }
    }

    /// Schema: #/$defs/model_config/properties/vqvae
    public struct VQVAEConfig: Codable, Hashable, Sendable {
        public var vocabSize: Int
        public var zChannels: Int
        public var ch: Int
        public var chMult: [Int]
        public var numResBlocks: Int
        public var vPatchNums: [Int]

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size"
            case zChannels = "z_channels"
            case ch
            case chMult = "ch_mult"
            case numResBlocks = "num_res_blocks"
            case vPatchNums = "v_patch_nums"
        }
    }
}

extension Manifest.VARConfig {
    /// Sequence length L = Σ pn².
    public var sequenceLength: Int { patchNums.reduce(0) { $0 + $1 * $1 } }

    /// Parameters of the VAR transformer (VQVAE excluded), computed from the config as
    /// `sum(p.numel() for p in var.parameters())` counts them in Python (Tests/Fixtures/params.json).
    public var parameterCount: Int {
        let c = embedDim
        var count = c                               // pos_start
        count += sequenceLength * c                 // pos_1LC
        count += c * cvae + c                       // word_embed
        count += (numClasses + 1) * c               // class_emb, with the unconditional class
        count += patchNums.count * c                // lvl_embed
        for block in 0..<depth {
            let attention = numHeads[block] * headDim
            let hidden = ffnDims[block]
            if attnL2Norm { count += numHeads[block] }          // scale_mul_1H11
            count += 2 * attention                              // q_bias, v_bias
            count += 3 * attention * c                          // mat_qkv (no bias)
            count += attention * c + c                          // proj
            count += hidden * c + hidden + c * hidden + c       // fc1, fc2
            count += sharedAln ? 6 * c : 6 * c * c + 6 * c      // ada_gss or ada_lin
        }
        if sharedAln { count += 6 * c * c + 6 * c }             // shared_ada_lin
        count += 2 * c * c + 2 * c                              // head_nm.ada_lin
        count += vocabSize * c + vocabSize                      // head
        return count
    }
}
