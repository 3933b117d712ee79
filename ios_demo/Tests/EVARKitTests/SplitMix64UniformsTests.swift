import XCTest
@testable import EVARKit

final class SplitMix64UniformsTests: XCTestCase {
    func testNameMatchesThePythonRuntime() throws {
        let fixture = try Fixtures.load(RNGFixture.self, "rng.json")
        XCTAssertEqual(SplitMix64Uniforms.name, fixture.rng)
    }

    func testStreamsMatchPythonBitForBit() throws {
        let fixture = try Fixtures.load(RNGFixture.self, "rng.json")
        XCTAssertFalse(fixture.streams.isEmpty)
        for stream in fixture.streams {
            let source = SplitMix64Uniforms(seed: try Fixtures.hex(stream.seed), stream: try Fixtures.hex(stream.stream))
            XCTAssertEqual(source.key, try Fixtures.hex(stream.key), "key of seed \(stream.seed) stream \(stream.stream)")
            for (offset, raw) in stream.raw.enumerated() {
                let index = stream.start &+ UInt64(offset)
                XCTAssertEqual(source.rawBits(at: index), try Fixtures.hex(raw))
                XCTAssertEqual(UInt32(source.rawBits(at: index) >> 40), stream.bits24[offset])
                XCTAssertEqual(source.uniform(at: index), Float(stream.uniforms[offset]))
            }
            XCTAssertEqual(source.uniforms(count: stream.uniforms.count, start: stream.start), stream.uniforms.floats)
        }
    }

    func testScaleUniformsFollowTheTokenIndexing() throws {
        let fixture = try Fixtures.load(RNGFixture.self, "rng.json")
        for scale in fixture.scaleUniforms {
            let drawn = SplitMix64Uniforms.scaleUniforms(
                seed: try Fixtures.hex(scale.seed), scaleIndex: scale.scaleIndex, batch: scale.batch,
                tokens: scale.tokens, firstSample: scale.firstSample)
            XCTAssertEqual(drawn, scale.uniforms.flatMap { $0 }.floats)
        }
    }

    func testUniformsAreIn01WithTwentyFourBits() {
        let source = SplitMix64Uniforms(seed: 42, stream: 7)
        for u in source.uniforms(count: 10_000) {
            XCTAssertTrue(u >= 0 && u < 1)
            XCTAssertEqual(u * 0x1p24, (u * 0x1p24).rounded())
        }
    }
}
