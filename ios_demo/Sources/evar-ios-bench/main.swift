// evar-ios-bench: latency of an EVAR Core ML artifact on this Mac, printed as the JSON `evar-bench`
// prints (ios_demo/README.md, "Bench JSON").
//
//   evar-ios-bench --artifact DIR --compute-units cpuAndNeuralEngine --iters 10 [--warmup 2] [--json out.json]

import EVARKit
import Foundation
#if os(macOS)
import ImageIO
import UniformTypeIdentifiers
#endif

let usage = """
    usage: evar-ios-bench --artifact DIR [--compute-units all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine]
                          [--iters 10] [--warmup 2] [--json out.json] [--class 0] [--seed 0] [--cfg 1.5]
                          [--verify-sampling] [--image out.png] [--tokens tokens.json]
    Loads every function once (load_ms), runs --warmup untimed generations, then --iters timed ones,
    and prints per-scale, decode and end-to-end median/p90 (and min) in milliseconds as JSON.
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

func runBench(_ arguments: BenchArguments) async throws {
    #if os(macOS) && canImport(CoreML)
    guard let artifact = arguments.artifact else { return }
    let pipeline = try EVARPipeline(artifactURL: artifact, computeUnits: arguments.computeUnits,
                                    options: .init(verifySampling: arguments.verifySampling))
    let configuration = GenerationConfiguration(classLabel: arguments.classLabel, seed: arguments.seed,
                                                cfg: arguments.cfg, computeUnits: arguments.computeUnits)
    let loadMs = try await pipeline.loadResources()
    var first: GenerationResult?
    for _ in 0..<arguments.warmup {
        let result = try await pipeline.generate(configuration)
        first = first ?? result
    }
    var runs: [StageTimings] = []
    var mismatches = 0
    for _ in 0..<arguments.iterations {
        let result = try await pipeline.generate(configuration)
        first = first ?? result
        runs.append(result.timings)
        mismatches += result.samplingMismatches ?? 0
    }
    let report = BenchReport(manifest: pipeline.manifest, artifactName: artifact.lastPathComponent,
                             configuration: configuration, runs: runs, warmup: arguments.warmup, loadMs: loadMs,
                             tool: "evar-ios-bench")
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
