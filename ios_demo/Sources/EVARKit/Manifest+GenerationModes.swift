// The optional generation modes of a VAR manifest (`generation`: scale split, token pruning, CFG trimming).
//
// Each one changes which graph runs which scale. A runtime that ignored one would run the plain step graph at
// every scale and return another model's image without a word, so EVARKit checks them before anything loads:
// a manifest that uses none of them runs as before (format_version 3 included); one that uses a mode this
// EVARKit does not drive is refused with one line naming the mode and what to do instead.

extension Manifest {
    /// The generation modes this manifest asks for, by name (empty: plain VAR decoding, CFG at every scale).
    public var generationModes: [String] {
        guard let generation else { return [] }
        var modes: [String] = []
        if generation.splitScale != nil || generation.earlyGraph != nil || generation.prefillGraph != nil
            || generation.earlyModel != nil {
            modes.append("scale split")
        }
        if !(generation.tokenKeep ?? [:]).isEmpty || !(generation.tokenKeepCounts ?? [:]).isEmpty
            || generation.cacheScale != nil || generation.prunedGraph != nil {
            modes.append("token pruning")
        }
        if generation.cfgUntilScale != nil || generation.unguidedGraph != nil {
            modes.append("CFG trimming")
        }
        return modes
    }

    /// Refuses a manifest whose generation modes EVARKit does not run (it runs none of them yet: the Core ML
    /// exports of these modes and their on-device drivers come together).
    func checkGenerationModes() throws {
        guard let generation, !generationModes.isEmpty else { return }
        if generationModes.contains("scale split") {
            let at = generation.splitScale.map { " from scale \($0)" } ?? ""
            throw EVARError.unsupportedArtifact(
                "scale split (generation.split_scale: another model's graph runs the first scales, then the prefill "
                + "graph\(at)): this EVARKit does not run it and will not run the compressed model alone; run the "
                + "artifact with `evar sample --artifact`, or re-export without --early-model / --split-scale")
        }
        if generationModes.contains("token pruning") {
            throw EVARError.unsupportedArtifact(
                "token pruning (generation.token_keep: decoder_step_pruned from scale \(generation.cacheScale ?? 0)): "
                + "this EVARKit does not run it; run the artifact with `evar sample --artifact`, or re-export "
                + "without --token-keep")
        }
        throw EVARError.unsupportedArtifact(
            "CFG trimming (generation.cfg_until_scale \(generation.cfgUntilScale ?? 0): decoder_step_unguided on the "
            + "conditional rows from that scale): this EVARKit does not run it and will not guide every scale "
            + "instead; run the artifact with `evar sample --artifact`, or re-export without --cfg-until-scale")
    }
}
