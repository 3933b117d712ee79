import XCTest
@testable import EVARKit

final class ManifestTests: XCTestCase {
    let names = ["manifest_tiny.json", "manifest_tiny_io.json"]

    func testTinyManifestsDecodeAndValidate() throws {
        for name in names {
            let manifest = try Manifest.decode(Fixtures.data(name))
            XCTAssertNoThrow(try manifest.validate(), name)
            XCTAssertEqual(manifest.sampling.rng, SplitMix64Uniforms.name)
            for scale in manifest.patchNums.indices {
                let step = try manifest.stepFunction(scaleIndex: scale)
                XCTAssertEqual(step.function.patchNum, manifest.patchNums[scale])
                XCTAssertNoThrow(try step.function.input(role: .uniforms))
                XCTAssertNoThrow(try step.function.output(role: .idx))
                XCTAssertNoThrow(try step.function.output(role: .fHat))
            }
            XCTAssertNoThrow(try manifest.vqvaeDecoder().function.output(role: .image))
        }
    }

    func testRoundTripKeepsEveryField() throws {
        for name in names {
            let manifest = try Manifest.decode(Fixtures.data(name))
            let again = try Manifest.decode(JSONEncoder().encode(manifest))
            XCTAssertEqual(manifest, again, name)
        }
    }

    func testKVLayoutMatchesMode() throws {
        let stateful = try Manifest.decode(Fixtures.data("manifest_tiny.json"))
        XCTAssertEqual(stateful.kvCache.mode, .state)
        XCTAssertFalse(try stateful.stepFunction(scaleIndex: 1).function.states?.isEmpty ?? true)
        let io = try Manifest.decode(Fixtures.data("manifest_tiny_io.json"))
        XCTAssertEqual(io.kvCache.mode, .io)
        // Core ML has no zero-size inputs: scale 0 takes no past, later scales one per layer and kind.
        XCTAssertFalse(try io.stepFunction(scaleIndex: 0).function.inputs.contains { $0.role == .pastKey })
        let pasts = try io.stepFunction(scaleIndex: 1).function.inputs.filter { $0.role == .pastKey }
        XCTAssertEqual(pasts.count, io.model.transformer.depth)
    }

    func testNewerFormatVersionIsAClearError() throws {
        var manifest = try Manifest.decode(Fixtures.data("manifest_tiny_io.json"))
        manifest.formatVersion = 4
        XCTAssertThrowsError(try manifest.validate()) { error in
            XCTAssertEqual(error as? EVARError, .unsupportedFormatVersion(found: 4, supported: 3))
        }
    }

    /// A newer manifest of another layout is refused by its version before any of its fields are decoded.
    func testNewerLayoutIsRefusedByVersionBeforeDecoding() throws {
        let data = Data(#"{"format": "evar-artifact", "format_version": 4, "family": "xyz"}"#.utf8)
        XCTAssertThrowsError(try Manifest.decode(data)) { error in
            XCTAssertEqual(error as? EVARError, .unsupportedFormatVersion(found: 4, supported: 3))
        }
        XCTAssertThrowsError(try FewStepManifest.decode(data)) { error in
            XCTAssertEqual(error as? EVARError, .unsupportedFormatVersion(found: 4, supported: 3))
        }
    }

    /// A plain VAR manifest written at format_version 3 (no generation mode) loads and validates as before.
    func testVersionThreeWithoutGenerationModesRuns() throws {
        var manifest = try Manifest.decode(Fixtures.data("manifest_tiny.json"))
        manifest.formatVersion = 3
        let again = try Manifest.decode(JSONEncoder().encode(manifest))
        XCTAssertNoThrow(try again.validate())
        XCTAssertEqual(again.generationModes, [])
    }

    /// `evar-export coreml --target ane`: format 2, sampling on the host, an fhat_update graph pinned to the CPU.
    func testHostSampledManifest() throws {
        let manifest = try Manifest.decode(Fixtures.data("manifest_tiny_ane.json"))
        XCTAssertNoThrow(try manifest.validate())
        XCTAssertEqual(manifest.formatVersion, 2)
        XCTAssertTrue(manifest.samplesOnHost)
        XCTAssertEqual(manifest.kvCache.paddedLength.map { $0 % 32 }, 0)
        for scale in manifest.patchNums.indices {
            let step = try manifest.stepFunction(scaleIndex: scale)
            XCTAssertNoThrow(try step.function.input(role: .classOnehot))
            XCTAssertNoThrow(try step.function.output(role: .rawLogits))
            XCTAssertEqual(step.computeUnits(requested: .cpuAndNeuralEngine), .cpuAndNeuralEngine)
            let update = try manifest.fhatUpdate(scaleIndex: scale)
            XCTAssertEqual(update.computeUnits(requested: .cpuAndNeuralEngine), .cpuOnly)
            XCTAssertNoThrow(try update.function.input(role: .idx))
        }
        XCTAssertEqual(manifest.stageUnits(.cpuAndNeuralEngine),
                       ["decoder_step": "cpuAndNeuralEngine", "fhat_update": "cpuOnly", "sampling": "host",
                        "vqvae_decoder": "cpuAndNeuralEngine"])
        XCTAssertNil(try Manifest.decode(Fixtures.data("manifest_tiny.json")).stageUnits(.cpuAndNeuralEngine))
        let again = try Manifest.decode(JSONEncoder().encode(manifest))
        XCTAssertEqual(manifest, again)
    }

    func testClassOnehotRows() {
        XCTAssertEqual(Sampler.classOnehot(labels: [2, 0], unconditional: 3),
                       [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1])
    }

    /// A label picked for a 1000-class artifact, given to a 10-class one, is clamped per artifact.
    func testClassLabelsAreClampedPerArtifact() {
        let configuration = GenerationConfiguration(classLabel: 207, classLabels: [3, 999, -1])
        let digits = configuration.clamped(toClasses: 10)
        XCTAssertEqual(digits.classLabel, 9)
        XCTAssertEqual(digits.classLabels, [3, 9, 0])
        XCTAssertEqual(configuration.clamped(toClasses: 1000).classLabel, 207)
    }

    func testMissingKeyNamesTheField() throws {
        var object = try XCTUnwrap(JSONSerialization.jsonObject(with: Fixtures.data("manifest_tiny_io.json"))
                                   as? [String: Any])
        object.removeValue(forKey: "kv_cache")
        let data = try JSONSerialization.data(withJSONObject: object)
        XCTAssertThrowsError(try Manifest.decode(data)) { error in
            XCTAssertTrue(error.localizedDescription.contains("kv_cache"), error.localizedDescription)
        }
    }

    func testParameterCountsMatchPyTorch() throws {
        let fixture = try Fixtures.load(ParamsFixture.self, "params.json")
        XCTAssertFalse(fixture.cases.isEmpty)
        for item in fixture.cases {
            XCTAssertEqual(item.transformer.parameterCount, item.params, item.name)
        }
        XCTAssertFalse(fixture.ddCases.isEmpty)
        for item in fixture.ddCases {
            XCTAssertEqual(item.transformer.fewStepStudentParameterCount, item.params, item.name)
        }
    }
}
