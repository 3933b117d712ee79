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
        manifest.formatVersion = 2
        XCTAssertThrowsError(try manifest.validate()) { error in
            XCTAssertEqual(error as? EVARError, .unsupportedFormatVersion(found: 2, supported: 1))
        }
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
    }
}
