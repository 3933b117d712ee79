// Reading a manifest from an artifact directory and checking that EVARKit can run it. Each check
// fails with a message naming the field, so a user learns what to re-export instead of seeing a
// Core ML error halfway through a generation.

import Foundation

extension Manifest {
    /// The newest manifest format this EVARKit reads (1; 2: host-sampled artifacts; 3: Distilled Decoding
    /// artifacts, read by `FewStepManifest`, and VAR artifacts whose generation modes `validate` checks).
    public static let supportedFormatVersion = 3
    /// The `format` of every EVAR artifact manifest.
    public static let formatName = "evar-artifact"
    /// Graph roles (keys of `graphs`).
    public static let decoderStepRole = "decoder_step"
    public static let vqvaeDecoderRole = "vqvae_decoder"
    /// Host-sampled artifacts: (f_hat, idx) → next f_hat, one function per scale, on the CPU.
    public static let fhatUpdateRole = "fhat_update"

    /// Decodes `manifest.json` from an artifact directory (no checks; see `validate(artifactDirectory:)`).
    public static func load(artifactDirectory: URL) throws -> Manifest {
        try decode(manifestData(artifactDirectory: artifactDirectory))
    }

    /// The fields every manifest version shares, read before the rest: a newer manifest gets the upgrade line,
    /// and a Distilled Decoding one (no `kv_cache`, no `decoder_step`) is sent to `FewStepManifest`, not met
    /// with a missing-key error.
    struct VersionHeader: Decodable {
        let formatVersion: Int?
        let family: String?
        enum CodingKeys: String, CodingKey {
            case formatVersion = "format_version"
            case family
        }

        static func read(_ data: Data) -> VersionHeader? {
            try? JSONDecoder().decode(VersionHeader.self, from: data)
        }
    }

    /// The `family` of a Distilled Decoding manifest.
    public static let fewStepFamily = "dd"

    /// Decodes a manifest, turning decoding errors into one line naming the field.
    public static func decode(_ data: Data) throws -> Manifest {
        let header = VersionHeader.read(data)
        if let version = header?.formatVersion, version > supportedFormatVersion {
            throw EVARError.unsupportedFormatVersion(found: version, supported: supportedFormatVersion)
        }
        if header?.family == fewStepFamily {
            throw EVARError.unsupportedArtifact("a Distilled Decoding artifact (family dd) has no scale loop: load it "
                                                + "with FewStepManifest / FewStepPipeline (EVARArtifact.load tells the kinds apart)")
        }
        return try decodeReporting(Manifest.self, from: data)
    }

    /// Decodes `T`, turning decoding errors into one line naming the field.
    static func decodeReporting<T: Decodable>(_ type: T.Type, from data: Data) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch let error as DecodingError {
            throw EVARError.invalidManifest(describe(error))
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [CodingKey]) -> String {
            keys.map { key -> String in
                if let index = key.intValue { return "[\(index)]" }
                return "." + key.stringValue
            }.joined()
        }
        switch error {
        case .keyNotFound(let key, let context):
            return "missing key \(path(context.codingPath + [key]))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return "\(path(context.codingPath)): \(context.debugDescription)"
        @unknown default:
            return error.localizedDescription
        }
    }

    /// Checks everything EVARKit relies on; with `artifactDirectory`, also that every listed file exists
    /// with the listed size.
    public func validate(artifactDirectory: URL? = nil) throws {
        guard format == Self.formatName else {
            throw EVARError.invalidManifest("format is \"\(format)\", expected \"\(Self.formatName)\"")
        }
        guard (1...Self.supportedFormatVersion).contains(formatVersion) else {
            throw EVARError.unsupportedFormatVersion(found: formatVersion, supported: Self.supportedFormatVersion)
        }
        if backend == .onnx {
            throw EVARError.unsupportedArtifact("an ONNX artifact; EVARKit runs Core ML artifacts "
                                                + "(evar-export coreml --model ... --out ...)")
        }
        for (role, graph) in graphs where graph.format != .coreml {
            throw EVARError.unsupportedArtifact("graph \(role) is \(graph.format.rawValue), EVARKit runs Core ML graphs")
        }
        guard sampling.rng == SplitMix64Uniforms.name else {
            throw EVARError.unsupportedArtifact("random source \(sampling.rng); EVARKit implements \(SplitMix64Uniforms.name)")
        }
        guard sampling.method == "inverse_cdf" else {
            throw EVARError.unsupportedArtifact("sampling method \(sampling.method)")
        }
        guard patchNums == model.transformer.patchNums else {
            throw EVARError.invalidManifest("patch_nums \(patchNums) differ from model.var.patch_nums "
                                            + "\(model.transformer.patchNums)")
        }
        try checkGenerationModes()
        for scale in patchNums.indices {
            _ = try stepFunction(scaleIndex: scale)
        }
        let decoder = try vqvaeDecoder()
        _ = try decoder.function.input(role: .fHat)
        _ = try decoder.function.output(role: .image)
        if samplesOnHost {
            for scale in patchNums.indices {
                let step = try stepFunction(scaleIndex: scale)
                _ = try step.function.input(role: .classOnehot)
                _ = try step.function.output(role: .rawLogits)
                let update = try fhatUpdate(scaleIndex: scale)
                _ = try update.function.input(role: .idx)
                _ = try update.function.output(role: .fHat)
            }
        }
        if let artifactDirectory {
            try checkFiles(in: artifactDirectory)
        }
    }

    /// Every listed file exists with its listed size (hashes are checked by `evar-export`; hashing a
    /// 600 MB package on a phone at every launch would cost more than it tells).
    public func checkFiles(in directory: URL) throws {
        try Self.checkFiles(files, in: directory)
    }

    /// `checkFiles(in:)` for any manifest's file list (the Distilled Decoding manifest shares it).
    static func checkFiles(_ files: [FileEntry], in directory: URL) throws {
        for file in files {
            let url = directory.appendingPathComponent(file.path)
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: url.path) else {
                throw EVARError.missingFile("\(file.path) listed in the manifest of \(directory.lastPathComponent)")
            }
            let size = (attributes[.size] as? NSNumber)?.intValue ?? -1
            guard size == file.bytes else {
                throw EVARError.invalidManifest("\(file.path) has \(size) bytes, the manifest says \(file.bytes)")
            }
        }
    }

    // MARK: Graph look-ups

    /// A graph and one of its functions.
    public struct GraphFunction: Hashable, Sendable {
        public var role: String
        public var graph: Graph
        public var function: Function
        /// Another graph role has functions in the same package (a CFG-trimmed or split iOS 18 artifact keeps
        /// the unguided and prefill functions in decoder_step.mlpackage).
        public var sharesPackage: Bool = false

        /// Core ML needs a function name only when the package holds several functions (a function with
        /// its own package, iOS 17, is that package's only one).
        public var coreMLFunctionName: String? {
            guard function.file == nil else { return nil }
            return graph.functions.count > 1 || sharesPackage || graph.scaleSelection == "function" ? function.name : nil
        }

        /// The package this function is in, relative to the artifact.
        public var file: String { function.file ?? graph.file }

        /// The units this function runs on: CPU for a graph the manifest pins there (`cpu_only`, the
        /// host-sampled artifact's fhat_update), the caller's choice for everything else.
        public func computeUnits(requested: ComputeUnits) -> ComputeUnits {
            graph.computeUnits == .cpuOnly ? .cpuOnly : requested
        }
    }

    /// Whether the step functions return raw logits and the host samples (`sampling.where == "host"`).
    public var samplesOnHost: Bool { sampling.`where` == .host || (sampling.`where` == nil && !sampling.inGraph) }

    /// The f_hat update of scale `scaleIndex` (host-sampled artifacts).
    public func fhatUpdate(scaleIndex: Int) throws -> GraphFunction {
        let graph = try graph(role: Self.fhatUpdateRole)
        guard let function = graph.functions.first(where: { $0.scaleIndex == scaleIndex }) else {
            throw EVARError.invalidManifest("fhat_update has no function for scale \(scaleIndex)")
        }
        return graphFunction(role: Self.fhatUpdateRole, graph: graph, function: function)
    }

    /// For the bench JSON: the units of each stage of a host-sampled artifact; nil for in-graph sampling.
    public func stageUnits(_ requested: ComputeUnits) -> [String: String]? {
        guard samplesOnHost else { return nil }
        var units = ["sampling": "host"]
        for role in [Self.decoderStepRole, Self.fhatUpdateRole, Self.vqvaeDecoderRole] {
            if let graph = graphs[role] {
                units[role] = (graph.computeUnits == .cpuOnly ? ComputeUnits.cpuOnly : requested).rawValue
            }
        }
        return units
    }

    func graph(role: String) throws -> Graph {
        guard let graph = graphs[role] else {
            throw EVARError.invalidManifest("no graph with role \(role) (graphs: \(graphs.keys.sorted()))")
        }
        return graph
    }

    /// `function` of the graph with `role`, knowing whether another role shares its package.
    func graphFunction(role: String, graph: Graph, function: Function) -> GraphFunction {
        let shared = function.file == nil && graphs.contains { $0.key != role && $0.value.file == graph.file }
        return GraphFunction(role: role, graph: graph, function: function, sharesPackage: shared)
    }

    /// The step function that runs scale `scaleIndex`: decoder_step's, or the early or unguided graph's when the
    /// manifest's generation recipe says so (`stepRole(scaleIndex:)`).
    public func stepFunction(scaleIndex: Int) throws -> GraphFunction {
        try stepFunction(role: stepRole(scaleIndex: scaleIndex), scaleIndex: scaleIndex)
    }

    /// The function of graph `role` for scale `scaleIndex` (exactly one).
    public func stepFunction(role: String, scaleIndex: Int) throws -> GraphFunction {
        let graph = try graph(role: role)
        let matches = graph.functions.filter { $0.scaleIndex == scaleIndex }
        guard matches.count == 1, let function = matches.first else {
            throw EVARError.unsupportedArtifact(
                "\(role) has \(matches.count) functions for scale \(scaleIndex); EVARKit needs exactly one "
                + "per scale it runs (Core ML multifunction export)")
        }
        if let patch = function.patchNum, patch != patchNums[scaleIndex] {
            throw EVARError.invalidManifest("function \(function.name) has patch_num \(patch), "
                                            + "patch_nums[\(scaleIndex)] is \(patchNums[scaleIndex])")
        }
        return graphFunction(role: role, graph: graph, function: function)
    }

    /// The VQVAE decoder function (`f_hat → image`).
    public func vqvaeDecoder() throws -> GraphFunction {
        let graph = try graph(role: Self.vqvaeDecoderRole)
        let function = graph.functions.first { $0.name == graph.defaultFunction } ?? graph.functions[0]
        return graphFunction(role: Self.vqvaeDecoderRole, graph: graph, function: function)
    }

    /// Number of samples per call (static Core ML shapes), 1 when the manifest does not say.
    public var batchSize: Int { batch?.size ?? 1 }

    /// Whether the graph builds the conditional + unconditional batch itself.
    public var graphDoublesBatchForGuidance: Bool { batch?.cfgDoubled ?? true }

    /// The label that means "no class" (classifier-free guidance).
    public var unconditionalLabel: Int { sampling.cfg.unconditionalLabel ?? model.transformer.numClasses }

    /// Token range `[begin, end)` of a scale, from the function or computed from `patch_nums`.
    public func tokenRange(scaleIndex: Int, function: Function) -> (begin: Int, end: Int) {
        if let range = function.tokenRange, range.count == 2 {
            return (range[0], range[1])
        }
        let begin = patchNums[..<scaleIndex].reduce(0) { $0 + $1 * $1 }
        return (begin, begin + patchNums[scaleIndex] * patchNums[scaleIndex])
    }
}

extension Manifest.Function {
    /// The one input with `role`.
    public func input(role: Manifest.TensorRole) throws -> Manifest.Tensor {
        guard let tensor = inputs.first(where: { $0.role == role }) else {
            throw EVARError.invalidManifest("function \(name) has no input with role \(role.rawValue)")
        }
        return tensor
    }

    /// The one output with `role`.
    public func output(role: Manifest.TensorRole) throws -> Manifest.Tensor {
        guard let tensor = outputs.first(where: { $0.role == role }) else {
            throw EVARError.invalidManifest("function \(name) has no output with role \(role.rawValue)")
        }
        return tensor
    }
}

extension Manifest.Tensor {
    /// Concrete sizes: static dims as they are, symbols from `symbols` (`batch`, `cfg_batch`, ...).
    public func concreteShape(symbols: [String: Int]) throws -> [Int] {
        try Manifest.Dimension.concrete(shape, symbols: symbols, tensor: name)
    }
}

extension Manifest.Dimension {
    /// The sizes of `shape`: static dims as they are, symbols from `symbols`; an unknown symbol names `tensor`.
    static func concrete(_ shape: [Manifest.Dimension], symbols: [String: Int], tensor: String) throws -> [Int] {
        try shape.map { dim in
            switch dim {
            case .size(let size):
                return size
            case .symbol(let symbol):
                guard let size = symbols[symbol] else {
                    throw EVARError.invalidManifest("tensor \(tensor) has dimension \(symbol), which EVARKit cannot size")
                }
                return size
            }
        }
    }
}
