import XCTest
@testable import EVARKit

/// A VAR manifest's generation recipe (manifest_tiny_split.json: iOS 18, state; manifest_tiny_split_io.json:
/// iOS 17, KV as inputs/outputs): scale split at 2, CFG trimming from 3, which function runs which scale.
final class GenerationModeTests: XCTestCase {
    let names = ["manifest_tiny_split.json", "manifest_tiny_split_io.json"]

    func testSplitAndTrimmedManifestsValidate() throws {
        for name in names {
            let manifest = try Manifest.decode(Fixtures.data(name))
            XCTAssertNoThrow(try manifest.validate(), name)
            XCTAssertEqual(manifest.formatVersion, 3)
            XCTAssertEqual(manifest.generationModes, ["scale split", "CFG trimming"])
            XCTAssertEqual(manifest.splitScale, 2)
            XCTAssertEqual(manifest.cfgUntilScale, 3)
        }
    }

    func testEachScaleRunsTheRecipesRole() throws {
        for name in names {
            let manifest = try Manifest.decode(Fixtures.data(name))
            XCTAssertEqual(manifest.patchNums.indices.map { manifest.stepRole(scaleIndex: $0) },
                           ["decoder_step_early", "decoder_step_early", "decoder_step", "decoder_step_unguided"], name)
            let unguided = try manifest.stepFunction(scaleIndex: 3).function
            XCTAssertEqual(unguided.name, "unguided_scale_3")
            XCTAssertThrowsError(try unguided.input(role: .cfg), "the unguided step takes no guidance")
            XCTAssertEqual(try unguided.input(role: .labels).shape, [.size(1)])
            let prefill = try manifest.prefillFunction().function
            XCTAssertEqual(try prefill.input(role: .idx).shape, [.size(1), .size(5)])  // 1 + 4 tokens before scale 2
            // the early model has its own layers' heads (4 each) in its cache
            let early = try manifest.stepFunction(scaleIndex: 1).function
            let cache = try XCTUnwrap((early.inputs + (early.states ?? [])).first {
                $0.role == .pastKey || $0.role == .keyCache
            })
            XCTAssertEqual(cache.shape[1], .size(4), name)
        }
    }

    /// iOS 18: the unguided and prefill functions live in decoder_step.mlpackage and share its state, so they
    /// are loaded by function name even when their role has a single function; the early model has its own.
    func testSharedPackagesNameTheirFunctions() throws {
        let manifest = try Manifest.decode(Fixtures.data("manifest_tiny_split.json"))
        let unguided = try manifest.stepFunction(scaleIndex: 3)
        XCTAssertEqual(unguided.file, "decoder_step.mlpackage")
        XCTAssertEqual(unguided.coreMLFunctionName, "unguided_scale_3")
        XCTAssertEqual(try manifest.prefillFunction().coreMLFunctionName, "prefill")
        XCTAssertEqual(try manifest.prefillFunction().file, "decoder_step.mlpackage")
        XCTAssertEqual(try manifest.stepFunction(scaleIndex: 0).file, "decoder_step_early.mlpackage")
        XCTAssertNil(try manifest.vqvaeDecoder().coreMLFunctionName)
        // iOS 17: one package per function, nothing to name
        let io = try Manifest.decode(Fixtures.data("manifest_tiny_split_io.json"))
        XCTAssertNil(try io.stepFunction(scaleIndex: 3).coreMLFunctionName)
        XCTAssertEqual(try io.prefillFunction().file, "prefill/prefill.mlpackage")
        XCTAssertEqual(try io.prefillFunction().function.outputs.filter { $0.role == .presentKey }.count,
                       io.model.transformer.depth)
    }

    func testEarlyTokensAreConcatenatedPerSample() {
        // two samples, scales of 1 and 4 tokens: sample 0's five tokens, then sample 1's
        let scales: [[Int32]] = [[1, 2], [10, 11, 12, 13, 20, 21, 22, 23]]
        XCTAssertEqual(Manifest.prefillTokens(scales, batch: 2), [1, 10, 11, 12, 13, 2, 20, 21, 22, 23])
    }

    func testTokenPruningAndHostSampledRecipesAreRefusedByName() throws {
        var manifest = try Manifest.decode(Fixtures.data("manifest_tiny_split.json"))
        manifest.generation = Manifest.Generation(tokenKeepCounts: ["3": 8], cacheScale: 3)
        XCTAssertThrowsError(try manifest.validate()) { error in
            XCTAssertTrue(error.localizedDescription.contains("token pruning"), error.localizedDescription)
        }
        var host = try Manifest.decode(Fixtures.data("manifest_tiny_ane.json"))
        host.generation = Manifest.Generation(cfgUntilScale: 3, unguidedGraph: "decoder_step_unguided")
        XCTAssertThrowsError(try host.validate()) { error in
            XCTAssertTrue(error.localizedDescription.contains("CFG trimming"), error.localizedDescription)
        }
    }

    func testSplitWithoutItsPrefillIsAClearError() throws {
        var manifest = try Manifest.decode(Fixtures.data("manifest_tiny_split_io.json"))
        manifest.graphs.removeValue(forKey: "prefill")
        XCTAssertThrowsError(try manifest.validate()) { error in
            XCTAssertTrue(error.localizedDescription.contains("prefill"), error.localizedDescription)
        }
        var outside = try Manifest.decode(Fixtures.data("manifest_tiny_split.json"))
        outside.generation?.cfgUntilScale = 1
        XCTAssertThrowsError(try outside.validate())
    }
}
