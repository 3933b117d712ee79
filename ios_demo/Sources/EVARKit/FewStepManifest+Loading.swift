// Reading a Distilled Decoding manifest and checking that EVARKit can run it, as `Manifest+Loading.swift` does
// for VAR artifacts: every check fails with one line naming the field, before any model loads.

import Foundation

/// An artifact folder of either kind: VAR's scale loop (`Manifest`, run by `EVARPipeline`) or Distilled
/// Decoding's few-step passes (`FewStepManifest`, run by `FewStepPipeline`).
public enum EVARArtifact: Hashable, Sendable {
    case scaleByScale(Manifest)
    case fewStep(FewStepManifest)

    /// Reads `manifest.json` and decodes it as the kind its `family` names (no checks; call `validate`).
    public static func load(artifactDirectory: URL) throws -> EVARArtifact {
        let data = try Manifest.manifestData(artifactDirectory: artifactDirectory)
        if Manifest.VersionHeader.read(data)?.family == Manifest.fewStepFamily {
            return .fewStep(try FewStepManifest.decode(data))
        }
        return .scaleByScale(try Manifest.decode(data))
    }

    /// Checks the manifest (and, with `artifactDirectory`, the listed files).
    public func validate(artifactDirectory: URL? = nil) throws {
        switch self {
        case .scaleByScale(let manifest): try manifest.validate(artifactDirectory: artifactDirectory)
        case .fewStep(let manifest): try manifest.validate(artifactDirectory: artifactDirectory)
        }
    }

    /// The model config both kinds carry (classes, parameters, scales).
    public var model: Manifest.ModelConfig {
        switch self {
        case .scaleByScale(let manifest): return manifest.model
        case .fewStep(let manifest): return manifest.model
        }
    }

    public var provenance: Manifest.Provenance {
        switch self {
        case .scaleByScale(let manifest): return manifest.provenance
        case .fewStep(let manifest): return manifest.provenance
        }
    }

    public var precision: Manifest.Precision {
        switch self {
        case .scaleByScale(let manifest): return manifest.precision
        case .fewStep(let manifest): return manifest.precision
        }
    }
}

extension Manifest {
    /// The bytes of `manifest.json` in an artifact directory.
    static func manifestData(artifactDirectory: URL) throws -> Data {
        let url = artifactDirectory.appendingPathComponent("manifest.json")
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw EVARError.missingFile("\(url.path) (is \(artifactDirectory.lastPathComponent) an evar-export output?)")
        }
        return try Data(contentsOf: url)
    }
}

extension FewStepManifest {
    /// The format version of every Distilled Decoding manifest.
    public static let fewStepFormatVersion = 3
    /// The graph role of the VQVAE decoder.
    public static let vqvaeDecoderRole = Manifest.vqvaeDecoderRole

    /// Decodes `manifest.json` from an artifact directory (no checks; see `validate(artifactDirectory:)`).
    public static func load(artifactDirectory: URL) throws -> FewStepManifest {
        try decode(Manifest.manifestData(artifactDirectory: artifactDirectory))
    }

    /// Decodes a DD manifest: a newer version gets the upgrade line, a VAR manifest a pointer to `Manifest`.
    public static func decode(_ data: Data) throws -> FewStepManifest {
        let header = Manifest.VersionHeader.read(data)
        if let version = header?.formatVersion, version > Manifest.supportedFormatVersion {
            throw EVARError.unsupportedFormatVersion(found: version, supported: Manifest.supportedFormatVersion)
        }
        guard header?.family == Manifest.fewStepFamily else {
            throw EVARError.unsupportedArtifact("not a Distilled Decoding artifact (family is not dd): load it with "
                                                + "Manifest / EVARPipeline")
        }
        return try Manifest.decodeReporting(FewStepManifest.self, from: data)
    }

    /// Checks everything `FewStepPipeline` relies on; with `artifactDirectory`, also every listed file's size.
    public func validate(artifactDirectory: URL? = nil) throws {
        guard format == Manifest.formatName else {
            throw EVARError.invalidManifest("format is \"\(format)\", expected \"\(Manifest.formatName)\"")
        }
        guard formatVersion == Self.fewStepFormatVersion, family == Manifest.fewStepFamily else {
            throw EVARError.invalidManifest("a Distilled Decoding manifest is format_version \(Self.fewStepFormatVersion), "
                                            + "family dd; found \(formatVersion), \(family)")
        }
        if backend == .onnx {
            throw EVARError.unsupportedArtifact("an ONNX artifact; EVARKit runs Core ML artifacts "
                                                + "(evar-export coreml --model DD_DIR --out ...)")
        }
        for (role, graph) in graphs where graph.format != .coreml {
            throw EVARError.unsupportedArtifact("graph \(role) is \(graph.format.rawValue), EVARKit runs Core ML graphs")
        }
        let noise = fewStep.noise
        guard noise.rng == SplitMix64Uniforms.name, noise.method == FewStepNoise.method else {
            throw EVARError.unsupportedArtifact("noise \(noise.method) on \(noise.rng); EVARKit implements "
                                                + "\(FewStepNoise.method) on \(SplitMix64Uniforms.name)")
        }
        guard patchNums == model.transformer.patchNums else {
            throw EVARError.invalidManifest("patch_nums \(patchNums) differ from model.var.patch_nums "
                                            + "\(model.transformer.patchNums)")
        }
        try checkPasses()
        _ = try passes(tList: fewStep.defaultTList)
        let decoder = try vqvaeDecoder()
        _ = try decoder.function.input(role: .fHat)
        _ = try decoder.function.output(role: .image)
        if let artifactDirectory {
            try Manifest.checkFiles(files, in: artifactDirectory)
        }
    }

    /// Every pass: a t below the scale count (increasing from 0), a graph with the inputs and outputs it needs.
    func checkPasses() throws {
        let ts = fewStep.passes.map(\.t)
        guard ts.first == 0, zip(ts, ts.dropFirst()).allSatisfy({ $0 < $1 }), (ts.last ?? 0) < patchNums.count else {
            throw EVARError.invalidManifest("few_step passes have t \(ts): they must increase from 0 and stay below "
                                            + "the \(patchNums.count) scales")
        }
        for pass in fewStep.passes {
            let function = try passFunction(pass).function
            var needed: [PassTensorRole] = [.labels, .noise]
            if pass.t > 0 { needed += [.givenTokens, .givenVectors] }
            for role in needed { _ = try function.input(role: role) }
            for role in [PassTensorRole.tokens, .vectors, .fHat] { _ = try function.output(role: role) }
        }
    }

    // MARK: Look-ups

    /// A graph and its one function.
    public struct GraphFunction: Hashable, Sendable {
        public var role: String
        public var graph: PassGraph
        public var function: PassFunction

        /// The package this function is in, relative to the artifact.
        public var file: String { graph.file }
    }

    func graph(role: String) throws -> PassGraph {
        guard let graph = graphs[role] else {
            throw EVARError.invalidManifest("no graph with role \(role) (graphs: \(graphs.keys.sorted()))")
        }
        return graph
    }

    /// The function of one pass (its graph's default function, or its only one).
    public func passFunction(_ pass: Pass) throws -> GraphFunction {
        let graph = try graph(role: pass.graph)
        guard let function = graph.functions.first(where: { $0.name == graph.defaultFunction }) ?? graph.functions.first
        else {
            throw EVARError.invalidManifest("graph \(pass.graph) declares no function")
        }
        return GraphFunction(role: pass.graph, graph: graph, function: function)
    }

    /// The VQVAE decoder function (`f_hat → image`).
    public func vqvaeDecoder() throws -> GraphFunction {
        let graph = try graph(role: Self.vqvaeDecoderRole)
        guard let function = graph.functions.first(where: { $0.name == graph.defaultFunction }) ?? graph.functions.first
        else {
            throw EVARError.invalidManifest("graph \(Self.vqvaeDecoderRole) declares no function")
        }
        return GraphFunction(role: Self.vqvaeDecoderRole, graph: graph, function: function)
    }

    /// The passes a t-list runs, in order: it must start at 0, increase, and use only exported passes' t.
    public func passes(tList: [Int]) throws -> [Pass] {
        let byT = Dictionary(fewStep.passes.map { ($0.t, $0) }, uniquingKeysWith: { first, _ in first })
        let increasing = zip(tList, tList.dropFirst()).allSatisfy { $0 < $1 }
        guard tList.first == 0, increasing, tList.allSatisfy({ byT[$0] != nil }) else {
            let offered = fewStep.passes.map { String($0.t) }.joined(separator: ",")
            throw EVARError.invalidConfiguration(
                "t-list \(tList.map(String.init).joined(separator: ",")): this artifact runs t-lists that start at 0 "
                + "and increase, drawn from t = \(offered); re-export with --t-list to add passes")
        }
        return tList.compactMap { byT[$0] }
    }

    /// Every t-list this artifact can run, fewest steps first: 0 alone, then 0 with any increasing choice of the
    /// other passes' t (one step, two steps, ...). What an app offers as "steps".
    public var availableTLists: [[Int]] {
        let later = fewStep.passes.map(\.t).filter { $0 > 0 }
        var lists: [[Int]] = [[0]]
        for t in later {
            lists += lists.map { $0 + [t] }
        }
        return lists.sorted { $0.count != $1.count ? $0.count < $1.count : $0.lexicographicallyPrecedes($1) }
    }

    /// Samples per call (static Core ML shapes), 1 when the manifest does not say.
    public var batchSize: Int { batch?.size ?? 1 }

    /// Sequence length L = Σ pn².
    public var sequenceLength: Int { patchNums.reduce(0) { $0 + $1 * $1 } }

    /// A pass's row-major `(batch, L)` tokens split per scale, row-major `(batch, pn²)` each: what a VAR
    /// generation reports, so token dumps of both kinds compare with `evar sample` the same way.
    public func tokensPerScale(_ tokens: [Int32], batch: Int) throws -> [[Int32]] {
        let length = sequenceLength
        guard tokens.count == batch * length else {
            throw EVARError.badOutput("\(tokens.count) tokens for \(batch) samples of \(length) tokens")
        }
        var scales: [[Int32]] = []
        var begin = 0
        for patch in patchNums {
            let count = patch * patch
            var scale: [Int32] = []
            scale.reserveCapacity(batch * count)
            for sample in 0..<batch {
                let start = sample * length + begin
                scale.append(contentsOf: tokens[start..<(start + count)])
            }
            scales.append(scale)
            begin += count
        }
        return scales
    }

    /// Parameters of the DD student (VQVAE excluded): VAR's transformer plus one more position and level, the
    /// noise/data flag embedding and the regression head (Tests/Fixtures/params.json, `dd_cases`).
    public var studentParameterCount: Int { model.transformer.fewStepStudentParameterCount }
}

extension Manifest.VARConfig {
    /// Parameters of a Distilled Decoding student built on this transformer (`evar.dd.model.DDStudent`):
    /// `pos_1LC` and `lvl_embed` have one more row, plus `flag_embed` (2 rows) and `reg_head` (C → Cvae).
    public var fewStepStudentParameterCount: Int {
        parameterCount + embedDim + embedDim + 2 * embedDim + embedDim * cvae + cvae
    }
}

extension FewStepManifest.PassFunction {
    /// The one input with `role`.
    public func input(role: FewStepManifest.PassTensorRole) throws -> FewStepManifest.PassTensor {
        guard let tensor = inputs.first(where: { $0.role == role }) else {
            throw EVARError.invalidManifest("function \(name) has no input with role \(role.rawValue)")
        }
        return tensor
    }

    /// The one output with `role`.
    public func output(role: FewStepManifest.PassTensorRole) throws -> FewStepManifest.PassTensor {
        guard let tensor = outputs.first(where: { $0.role == role }) else {
            throw EVARError.invalidManifest("function \(name) has no output with role \(role.rawValue)")
        }
        return tensor
    }
}

extension FewStepManifest.PassTensor {
    /// Concrete sizes (`batch` is the only symbol a DD manifest uses).
    public func concreteShape(symbols: [String: Int]) throws -> [Int] {
        try Manifest.Dimension.concrete(shape, symbols: symbols, tensor: name)
    }
}
