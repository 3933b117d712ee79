import XCTest
@testable import EVARKit

/// Distilled Decoding artifacts: the manifest (manifest_tiny_dd.json, from a tiny DD student exported by the
/// Python side) and the noise (dd_noise.json, from evar.contract.few_step).
final class FewStepTests: XCTestCase {
    func testNoiseMatchesPythonBitForBit() throws {
        let fixture = try Fixtures.load(DDNoiseFixture.self, "dd_noise.json")
        XCTAssertEqual(fixture.rng, SplitMix64Uniforms.name)
        XCTAssertEqual(fixture.noiseStream, FewStepNoise.streamOffset)
        XCTAssertFalse(fixture.tokens.isEmpty)
        for item in fixture.tokens {
            let values = FewStepNoise.tokenNoise(
                seed: try Fixtures.hex(item.seed), scaleIndex: item.scaleIndex, firstSample: item.firstSample,
                batch: item.batch, tokens: item.tokens, dim: item.dim)
            XCTAssertEqual(values, item.values.floats, "seed \(item.seed) scale \(item.scaleIndex)")
        }
    }

    func testSequenceNoiseConcatenatesScalesPerSample() throws {
        let fixture = try Fixtures.load(DDNoiseFixture.self, "dd_noise.json")
        XCTAssertFalse(fixture.sequences.isEmpty)
        for item in fixture.sequences {
            let values = FewStepNoise.sequence(seed: try Fixtures.hex(item.seed), firstSample: item.firstSample,
                                               batch: item.batch, patchNums: item.patchNums, dim: item.dim)
            XCTAssertEqual(values, item.values.floats, "seed \(item.seed)")
        }
    }

    /// Sample i's noise is the same in any batch: a batch of two starting at sample 3 holds sample 4 second.
    func testNoiseIsNumberedBySample() {
        let pair = FewStepNoise.sequence(seed: 9, firstSample: 3, batch: 2, patchNums: [1, 2], dim: 4)
        let alone = FewStepNoise.sequence(seed: 9, firstSample: 4, batch: 1, patchNums: [1, 2], dim: 4)
        XCTAssertEqual(Array(pair[(5 * 4)...]), alone)
    }

    func testTinyManifestDecodesAndValidates() throws {
        let manifest = try FewStepManifest.decode(Fixtures.data("manifest_tiny_dd.json"))
        XCTAssertNoThrow(try manifest.validate())
        XCTAssertEqual(manifest.formatVersion, 3)
        XCTAssertEqual(manifest.family, "dd")
        XCTAssertEqual(manifest.batchSize, 1)
        XCTAssertEqual(manifest.fewStep.passes.map(\.t), [0, 2])
        XCTAssertEqual(manifest.fewStep.noise.method, FewStepNoise.method)
        XCTAssertEqual(manifest.availableTLists, [[0], [0, 2]])
        let second = try manifest.passFunction(manifest.fewStep.passes[1]).function
        XCTAssertEqual(try second.input(role: .givenTokens).dtype, .int32)
        XCTAssertEqual(second.tokenRange, [manifest.fewStep.passes[1].givenTokens, manifest.sequenceLength])
        XCTAssertNoThrow(try manifest.vqvaeDecoder().function.output(role: .image))
        let again = try FewStepManifest.decode(JSONEncoder().encode(manifest))
        XCTAssertEqual(manifest, again)
    }

    func testLoaderTellsTheKindsApart() throws {
        let data = try Fixtures.data("manifest_tiny_dd.json")
        XCTAssertThrowsError(try Manifest.decode(data)) { error in
            XCTAssertTrue(error.localizedDescription.contains("Distilled Decoding"), error.localizedDescription)
        }
        XCTAssertThrowsError(try FewStepManifest.decode(Fixtures.data("manifest_tiny.json"))) { error in
            XCTAssertTrue(error.localizedDescription.contains("not a Distilled Decoding"), error.localizedDescription)
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        try data.write(to: directory.appendingPathComponent("manifest.json"))
        guard case .fewStep(let manifest) = try EVARArtifact.load(artifactDirectory: directory) else {
            return XCTFail("a family dd manifest must load as a few-step artifact")
        }
        XCTAssertEqual(manifest.provenance.modelRef, "fixtures:tiny-dd")
    }

    func testTListsAreCheckedAgainstThePasses() throws {
        let manifest = try FewStepManifest.decode(Fixtures.data("manifest_tiny_dd.json"))
        XCTAssertEqual(try manifest.passes(tList: [0, 2]).map(\.graph), ["dd_pass_t0", "dd_pass_t2"])
        for bad in [[2], [0, 1], [0, 2, 2], [], [0, 3]] {
            XCTAssertThrowsError(try manifest.passes(tList: bad), "\(bad)") { error in
                XCTAssertTrue(error.localizedDescription.contains("t-list"), error.localizedDescription)
            }
        }
    }

    func testTokensSplitPerScale() throws {
        let manifest = try FewStepManifest.decode(Fixtures.data("manifest_tiny_dd.json"))
        let length = manifest.sequenceLength  // 1 + 4 + 9 + 16
        let tokens = (0..<(2 * length)).map { Int32($0) }
        let scales = try manifest.tokensPerScale(tokens, batch: 2)
        XCTAssertEqual(scales.count, manifest.patchNums.count)
        XCTAssertEqual(scales[0], [0, Int32(length)])
        XCTAssertEqual(scales[1], [1, 2, 3, 4] + [1, 2, 3, 4].map { $0 + Int32(length) })
        XCTAssertThrowsError(try manifest.tokensPerScale(tokens, batch: 1))
    }

    func testStudentParameterCount() throws {
        let manifest = try FewStepManifest.decode(Fixtures.data("manifest_tiny_dd.json"))
        let fixture = try Fixtures.load(ParamsFixture.self, "params.json")
        let tiny = try XCTUnwrap(fixture.ddCases.first { $0.name == "tiny_dd" })
        XCTAssertEqual(manifest.studentParameterCount, tiny.params)
    }
}
