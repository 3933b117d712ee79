// The shared test vectors in Tests/Fixtures, written by ios_demo/scripts/make_fixtures.py from the
// Python reference. tests/test_ios_demo.py checks the same files against Python, so passing here
// means agreeing with `evar sample`.

import Foundation
import XCTest
@testable import EVARKit

enum Fixtures {
    /// Tests/Fixtures, found from this source file so `swift test` and Xcode read the committed files.
    static let directory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .appendingPathComponent("Fixtures")

    static func data(_ name: String) throws -> Data {
        try Data(contentsOf: directory.appendingPathComponent(name))
    }

    static func load<T: Decodable>(_ type: T.Type, _ name: String) throws -> T {
        try JSONDecoder().decode(T.self, from: data(name))
    }

    /// `0x...` hex strings hold 64-bit values exactly (JSON numbers are doubles in many decoders).
    static func hex(_ text: String) throws -> UInt64 {
        let digits = text.hasPrefix("0x") ? String(text.dropFirst(2)) : text
        return try XCTUnwrap(UInt64(digits, radix: 16), "not a hex number: \(text)")
    }
}

// MARK: File layouts

struct RNGFixture: Decodable {
    struct Stream: Decodable {
        var seed: String
        var stream: String
        var start: UInt64
        var key: String
        var raw: [String]
        var bits24: [UInt32]
        var uniforms: [Double]
    }

    struct ScaleCase: Decodable {
        var seed: String
        var scaleIndex: Int
        var batch: Int
        var tokens: Int
        var firstSample: Int
        var uniforms: [[Double]]

        enum CodingKeys: String, CodingKey {
            case seed, batch, tokens, uniforms
            case scaleIndex = "scale_index"
            case firstSample = "first_sample"
        }
    }

    var rng: String
    var streams: [Stream]
    var scaleUniforms: [ScaleCase]

    enum CodingKeys: String, CodingKey {
        case rng, streams
        case scaleUniforms = "scale_uniforms"
    }
}

struct SamplingFixture: Decodable {
    struct Filter: Decodable {
        var name: String
        var vocab: Int
        var topK: Int
        var topP: Double
        var logits: [Double]
        var kept: [Bool]
        var uniforms: [Double]
        var indices: [Int]

        enum CodingKeys: String, CodingKey {
            case name, vocab, logits, kept, uniforms, indices
            case topK = "top_k"
            case topP = "top_p"
        }
    }

    struct Guidance: Decodable {
        var cfg: Double
        var scaleIndex: Int
        var numScales: Int
        var t: Double
        var cond: [Double]
        var uncond: [Double]
        var combined: [Double]

        enum CodingKeys: String, CodingKey {
            case cfg, t, cond, uncond, combined
            case scaleIndex = "scale_index"
            case numScales = "num_scales"
        }
    }

    struct Scale: Decodable {
        var name: String
        var seed: String
        var scaleIndex: Int
        var patch: Int
        var numScales: Int
        var batch: Int
        var firstSample: Int
        var vocab: Int
        var cfg: Double
        var topK: Int
        var topP: Double
        var logits: [[Double]]
        var indices: [[Int]]

        enum CodingKeys: String, CodingKey {
            case name, seed, patch, batch, vocab, cfg, logits, indices
            case scaleIndex = "scale_index"
            case numScales = "num_scales"
            case firstSample = "first_sample"
            case topK = "top_k"
            case topP = "top_p"
        }
    }

    var filters: [Filter]
    var cfg: [Guidance]
    var scales: [Scale]
}

struct StatisticsFixture: Decodable {
    struct Case: Decodable {
        var values: [Double]
        var median: Double
        var p90: Double
        var min: Double
        var mean: Double
    }

    var cases: [Case]
}

struct ParamsFixture: Decodable {
    struct Case: Decodable {
        var name: String
        var transformer: Manifest.VARConfig
        var params: Int

        enum CodingKeys: String, CodingKey {
            case name, params
            case transformer = "var"
        }
    }

    var cases: [Case]
    /// Distilled Decoding students built on these transformers.
    var ddCases: [Case]

    enum CodingKeys: String, CodingKey {
        case cases
        case ddCases = "dd_cases"
    }
}

/// evar.contract.few_step: the per-token noise of Distilled Decoding artifacts.
struct DDNoiseFixture: Decodable {
    struct TokenCase: Decodable {
        var seed: String
        var scaleIndex: Int
        var firstSample: Int
        var batch: Int
        var tokens: Int
        var dim: Int
        var values: [Double]

        enum CodingKeys: String, CodingKey {
            case seed, batch, tokens, dim, values
            case scaleIndex = "scale_index"
            case firstSample = "first_sample"
        }
    }

    struct SequenceCase: Decodable {
        var seed: String
        var firstSample: Int
        var batch: Int
        var patchNums: [Int]
        var dim: Int
        var values: [Double]

        enum CodingKeys: String, CodingKey {
            case seed, batch, dim, values
            case firstSample = "first_sample"
            case patchNums = "patch_nums"
        }
    }

    var rng: String
    var noiseStream: UInt64
    var tokens: [TokenCase]
    var sequences: [SequenceCase]

    enum CodingKeys: String, CodingKey {
        case rng, tokens, sequences
        case noiseStream = "noise_stream"
    }
}

struct Float16Fixture: Decodable {
    struct Case: Decodable {
        var float: Double
        var halfBits: UInt16
        var back: Double?

        enum CodingKeys: String, CodingKey {
            case float, back
            case halfBits = "half_bits"
        }
    }

    struct DecodeCase: Decodable {
        var halfBits: UInt16
        var back: Double

        enum CodingKeys: String, CodingKey {
            case back
            case halfBits = "half_bits"
        }
    }

    var cases: [Case]
    var decodeOnly: [DecodeCase]

    enum CodingKeys: String, CodingKey {
        case cases
        case decodeOnly = "decode_only"
    }
}

struct ImageFixture: Decodable {
    /// Inputs JSON cannot hold, spelled `nan`, `inf`, `-inf` (Swift's `Float(_:)` reads them).
    struct NonFinite: Decodable {
        var inputs: [String]
        var rgb: [Int]
    }

    var shape: [Int]
    var chw: [[[[Double]]]]
    var rgb: [[[[Int]]]]
    var nonFinite: NonFinite

    enum CodingKeys: String, CodingKey {
        case shape, chw, rgb
        case nonFinite = "non_finite"
    }
}

extension Array where Element == Double {
    /// The fixture's float32 values (each JSON number is the exact value of a Float).
    var floats: [Float] { map { Float($0) } }
}
