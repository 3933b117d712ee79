// evar-ios-bench: latency of an EVAR Core ML artifact on this Mac, printed as the JSON `evar-bench`
// prints (ios_demo/README.md, "Bench JSON").
//
//   evar-ios-bench --artifact DIR --compute-units cpuAndNeuralEngine --iters 10 [--warmup 2] [--json out.json]
//   evar-ios-bench --artifact DD_DIR --t-list 0,5      # a Distilled Decoding artifact: the passes of a t-list

import EVARKit
import Foundation
#if os(macOS)
import ImageIO
import UniformTypeIdentifiers
#endif

let usage = """
    usage: evar-ios-bench --artifact DIR [--compute-units all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine]
                          [--iters 10] [--warmup 2] [--json out.json] [--class 0] [--seed 0] [--cfg 1.5]
                          [--verify-sampling] [--image out.png] [--tokens tokens.json] [--t-list 0,5]
    Loads every function once (load_ms), runs --warmup untimed generations, then --iters timed ones,
    and prints per-scale, decode and end-to-end median/p90 (and min) in milliseconds as JSON.
    A Distilled Decoding artifact (manifest family dd) runs the student passes of --t-list (default: the
    manifest's default_t_list; 0 = one step, 0,T = two) and reports per-pass times in few_step; --cfg and
    --verify-sampling do not apply to it.
    """

struct BenchArguments {
    var artifact: URL?
    var computeUnits = ComputeUnits.cpuAndNeuralEngine
    var iterations = 10
    var warmup = 2
    var json: URL?
    var classLabel = 0
    var seed: UInt64 = 0
    var cfg = 1.5
    var verifySampling = false
    var image: URL?
    var tokens: URL?
    var tList: [Int]?

    init(_ arguments: [String]) throws {
        var rest = arguments[...]
        func value(_ flag: String) throws -> String {
            guard let next = rest.popFirst() else { throw BenchError.usage("\(flag) needs a value") }
            return next
        }
        func number<T: LosslessStringConvertible>(_ flag: String, _ type: T.Type) throws -> T {
            let text = try value(flag)
            guard let parsed = T(text) else { throw BenchError.usage("\(flag): not a number: \(text)") }
            return parsed
        }
        while let flag = rest.popFirst() {
            switch flag {
            case "--artifact": artifact = URL(fileURLWithPath: try value(flag))
            case "--compute-units":
                let text = try value(flag)
                guard let units = ComputeUnits(argument: text) else {
                    throw BenchError.usage("--compute-units: unknown \(text) (all, cpuOnly, cpuAndGPU, cpuAndNeuralEngine)")
                }
                computeUnits = units
            case "--iters", "--iterations": iterations = try number(flag, Int.self)
            case "--warmup": warmup = try number(flag, Int.self)
            case "--json": json = URL(fileURLWithPath: try value(flag))
            case "--class": classLabel = try number(flag, Int.self)
            case "--seed": seed = try number(flag, UInt64.self)
            case "--cfg": cfg = try number(flag, Double.self)
            case "--verify-sampling": verifySampling = true
            case "--image": image = URL(fileURLWithPath: try value(flag))
            case "--tokens": tokens = URL(fileURLWithPath: try value(flag))
            case "--t-list":
                let text = try value(flag)
                let values = text.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
                guard !values.isEmpty, values.allSatisfy({ $0 != nil }) else {
                    throw BenchError.usage("--t-list: comma-separated integers, e.g. 0,5 (got \(text))")
                }
                tList = values.compactMap { $0 }
            case "-h", "--help": throw BenchError.help
            default: throw BenchError.usage("unknown argument \(flag)")
            }
        }
        guard artifact != nil else { throw BenchError.usage("--artifact DIR is required") }
        guard iterations >= 1, warmup >= 0 else { throw BenchError.usage("--iters must be >= 1 and --warmup >= 0") }
    }
}

enum BenchError: Error {
    case usage(String)
    case help
}

/// Tokens of one generation, for comparing with `evar sample` in Python (same seed → same tokens).
struct TokenDump: Codable {
    var seed: UInt64
    var classLabel: Int
    var cfg: Double
    var tokens: [[Int32]]

    enum CodingKeys: String, CodingKey {
        case seed
        case classLabel = "class"
        case cfg
        case tokens
    }
}

#if os(macOS) && canImport(CoreML)
func writePNG(_ result: GenerationResult, to url: URL) throws {
    guard let image = result.images.first,
          let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil)
    else {
        throw EVARError.badOutput("could not encode \(url.path)")
    }
    CGImageDestinationAddImage(destination, image, nil)
    guard CGImageDestinationFinalize(destination) else {
        throw EVARError.badOutput("could not write \(url.path)")
    }
}
#endif

#if os(macOS) && canImport(CoreML)
/// Warm-up runs, then timed runs: the first result (for --image / --tokens) and the timed runs' timings.
func timedRuns(_ arguments: BenchArguments, _ generate: () async throws -> GenerationResult) async throws
    -> (first: GenerationResult?, runs: [StageTimings], mismatches: Int) {
    var first: GenerationResult?
    for _ in 0..<arguments.warmup {
        let result = try await generate()
        first = first ?? result
    }
    var runs: [StageTimings] = []
    var mismatches = 0
    for _ in 0..<arguments.iterations {
        let result = try await generate()
        first = first ?? result
        runs.append(result.timings)
        mismatches += result.samplingMismatches ?? 0
    }
    return (first, runs, mismatches)
}
#endif

func runBench(_ arguments: BenchArguments) async throws {
    #if os(macOS) && canImport(CoreML)
    guard let artifact = arguments.artifact else { return }
    let report: BenchReport
    let first: GenerationResult?
    var mismatches = 0
    switch try EVARArtifact.load(artifactDirectory: artifact) {
    case .scaleByScale:
        if arguments.tList != nil {
            throw BenchError.usage("--t-list goes with a Distilled Decoding artifact; \(artifact.lastPathComponent) "
                                   + "is a VAR export")
        }
        let pipeline = try EVARPipeline(artifactURL: artifact, computeUnits: arguments.computeUnits,
                                        options: .init(verifySampling: arguments.verifySampling))
        let configuration = GenerationConfiguration(classLabel: arguments.classLabel, seed: arguments.seed,
                                                    cfg: arguments.cfg, computeUnits: arguments.computeUnits)
        let loadMs = try await pipeline.loadResources()
        let timed = try await timedRuns(arguments) { try await pipeline.generate(configuration) }
        first = timed.first
        mismatches = timed.mismatches
        report = BenchReport(manifest: pipeline.manifest, artifactName: artifact.lastPathComponent,
                             configuration: configuration, runs: timed.runs, warmup: arguments.warmup, loadMs: loadMs,
                             tool: "evar-ios-bench")
    case .fewStep:
        let pipeline = try FewStepPipeline(artifactURL: artifact, computeUnits: arguments.computeUnits)
        let tList = arguments.tList ?? pipeline.manifest.fewStep.defaultTList
        _ = try pipeline.manifest.passes(tList: tList)  // a t-list the artifact lacks: one line, before loading
        let configuration = GenerationConfiguration(classLabel: arguments.classLabel, seed: arguments.seed, cfg: 0,
                                                    computeUnits: arguments.computeUnits)
        let loadMs = try await pipeline.loadResources()
        let timed = try await timedRuns(arguments) { try await pipeline.generate(configuration, tList: tList) }
        first = timed.first
        report = try BenchReport(fewStep: pipeline.manifest, tList: tList, artifactName: artifact.lastPathComponent,
                                 configuration: configuration, runs: timed.runs, warmup: arguments.warmup,
                                 loadMs: loadMs, tool: "evar-ios-bench")
    }
    let data = try report.jsonData()
    print(String(decoding: data, as: UTF8.self))
    if let json = arguments.json {
        try data.write(to: json, options: .atomic)
    }
    if let result = first {
        if let url = arguments.image {
            try writePNG(result, to: url)
        }
        if let url = arguments.tokens {
            let dump = TokenDump(seed: arguments.seed, classLabel: arguments.classLabel, cfg: arguments.cfg,
                                 tokens: result.tokens)
            try JSONEncoder().encode(dump).write(to: url, options: .atomic)
        }
    }
    if arguments.verifySampling {
        FileHandle.standardError.write(Data("host vs graph sampling: \(mismatches) differing tokens\n".utf8))
    }
    #else
    throw EVARError.unsupportedOS("evar-ios-bench runs Core ML, which needs macOS")
    #endif
}

do {
    try await runBench(try BenchArguments(Array(CommandLine.arguments.dropFirst())))
} catch BenchError.help {
    print(usage)
} catch BenchError.usage(let message) {
    FileHandle.standardError.write(Data("evar-ios-bench: \(message)\n\(usage)\n".utf8))
    exit(2)
} catch {
    FileHandle.standardError.write(Data("evar-ios-bench: error: \(error.localizedDescription)\n".utf8))
    exit(2)
}
