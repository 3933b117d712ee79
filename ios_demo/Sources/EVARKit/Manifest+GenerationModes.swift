// The optional generation modes of a VAR manifest (`generation`): which graph runs which scale, as
// the Python runtime reads it (runtime/backends/ort.py, the Core ML backend).
//
//     scales < split_scale          early_graph (the early model, its own KV cache); its tokens are kept
//     scale == split_scale          first prefill_graph(labels, those tokens) → the compressed model's cache
//     scale == cfg_until_scale      first keep rows [0, B) of every cached key/value (a Core ML state: the
//                                   unguided functions touch rows [0, B) only, so there is nothing to cut)
//     scales >= cfg_until_scale     unguided_graph (the conditional rows, no cfg input)
//     otherwise                     decoder_step
//
// A runtime that ignored a mode would run the plain step graph at every scale and return another recipe's
// image without a word, so EVARKit follows the recipe exactly (EVARPipeline+Scales.swift) or, for what it does
// not drive (token pruning; any mode of a host-sampled artifact), refuses the manifest before anything loads.

extension Manifest {
    /// Graph roles of the generation modes (the defaults the exporters write).
    public static let earlyStepRole = "decoder_step_early"
    public static let prefillRole = "prefill"
    public static let unguidedStepRole = "decoder_step_unguided"

    /// The generation modes this manifest asks for, by name (empty: plain VAR decoding, CFG at every scale).
    public var generationModes: [String] {
        guard let generation else { return [] }
        var modes: [String] = []
        if generation.splitScale != nil || generation.earlyGraph != nil || generation.prefillGraph != nil
            || generation.earlyModel != nil {
            modes.append("scale split")
        }
        if !(generation.tokenKeep ?? [:]).isEmpty || !(generation.tokenKeepCounts ?? [:]).isEmpty
            || generation.cacheScale != nil || generation.prunedGraph != nil
            || generation.prunedUnguidedGraph != nil {
            modes.append("token pruning")
        }
        if generation.cfgUntilScale != nil || generation.unguidedGraph != nil {
            modes.append("CFG trimming")
        }
        return modes
    }

    /// Scale split: the first scale the compressed model runs (after the prefill); nil without a split.
    public var splitScale: Int? { generation?.splitScale }

    /// CFG trimming: the first scale run on the conditional rows only; nil without trimming.
    public var cfgUntilScale: Int? { generation?.cfgUntilScale }

    /// The graph role that runs scale `scaleIndex`.
    public func stepRole(scaleIndex: Int) -> String {
        if let split = splitScale, scaleIndex < split {
            return generation?.earlyGraph ?? Self.earlyStepRole
        }
        if let trim = cfgUntilScale, scaleIndex >= trim {
            return generation?.unguidedGraph ?? Self.unguidedStepRole
        }
        return Self.decoderStepRole
    }

    /// The prefill function of a scale split (labels and the early tokens → the compressed model's cache).
    public func prefillFunction() throws -> GraphFunction {
        let role = generation?.prefillGraph ?? Self.prefillRole
        let graph = try graph(role: role)
        guard graph.functions.count == 1, let function = graph.functions.first else {
            throw EVARError.invalidManifest("\(role) declares \(graph.functions.count) functions, a split needs one")
        }
        return graphFunction(role: role, graph: graph, function: function)
    }

    /// The early scales' tokens (row-major `(batch, pn²)` each) as the prefill takes them: row-major
    /// `(batch, T)`, each sample's scales coarse to fine.
    public static func prefillTokens(_ scales: [[Int32]], batch: Int) -> [Int32] {
        var out: [Int32] = []
        for sample in 0..<batch {
            for tokens in scales {
                let count = tokens.count / max(batch, 1)
                out.append(contentsOf: tokens[(sample * count)..<((sample + 1) * count)])
            }
        }
        return out
    }

    /// Checks the generation modes before anything loads: token pruning and modes of host-sampled artifacts are
    /// refused with one line naming the mode; a split or trimming scale must be inside the scales, and the
    /// prefill must take labels and the early tokens (and, with the KV cache as inputs/outputs, return every
    /// layer's cache).
    func checkGenerationModes() throws {
        let modes = generationModes
        guard let generation, !modes.isEmpty else { return }
        if modes.contains("token pruning") {
            throw EVARError.unsupportedArtifact(
                "token pruning (generation.token_keep: decoder_step_pruned from scale \(generation.cacheScale ?? 0)): "
                + "this EVARKit does not run it and will not run every token instead; run the artifact with "
                + "`evar sample --artifact`, or re-export without --token-keep")
        }
        if samplesOnHost {
            throw EVARError.unsupportedArtifact(
                "\(modes.joined(separator: " and ")) on a host-sampled artifact: this EVARKit follows those recipes "
                + "with in-graph sampling only; re-export without them or without --target ane")
        }
        let scales = patchNums.count
        if let split = generation.splitScale {
            guard (1..<scales).contains(split) else {
                throw EVARError.invalidManifest("generation.split_scale \(split) is outside 1..<\(scales)")
            }
            let prefill = try prefillFunction().function
            _ = try prefill.input(role: .labels)
            _ = try prefill.input(role: .idx)
            if kvCache.mode == .io {
                let presents = prefill.outputs.filter { $0.role == .presentKey || $0.role == .presentValue }
                guard presents.count == 2 * model.transformer.depth else {
                    throw EVARError.invalidManifest("prefill returns \(presents.count) cache tensors, the model has "
                                                    + "\(model.transformer.depth) layers of keys and values")
                }
            }
        } else if modes.contains("scale split") {
            throw EVARError.invalidManifest("generation names an early model or prefill but no split_scale")
        }
        if let trim = generation.cfgUntilScale {
            guard (1..<scales).contains(trim), trim >= (generation.splitScale ?? 0) else {
                throw EVARError.invalidManifest("generation.cfg_until_scale \(trim) is outside 1..<\(scales) or "
                                                + "before the split")
            }
        } else if modes.contains("CFG trimming") {
            throw EVARError.invalidManifest("generation names an unguided graph but no cfg_until_scale")
        }
    }
}
