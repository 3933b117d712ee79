import XCTest
@testable import EVARKit

final class SamplerTests: XCTestCase {
    func testGuidanceMatchesPythonExactly() throws {
        let fixture = try Fixtures.load(SamplingFixture.self, "sampling.json")
        for guidance in fixture.cfg {
            let t = Sampler.guidanceRatio(cfg: guidance.cfg, scaleIndex: guidance.scaleIndex, numScales: guidance.numScales)
            XCTAssertEqual(t, guidance.t)
            let combined = Sampler.applyGuidance(cond: guidance.cond.floats, uncond: guidance.uncond.floats, ratio: t)
            XCTAssertEqual(combined, guidance.combined.floats, "cfg \(guidance.cfg) scale \(guidance.scaleIndex)")
        }
    }

    func testTopKTopPKeepTheSameTokens() throws {
        let fixture = try Fixtures.load(SamplingFixture.self, "sampling.json")
        for filter in fixture.filters {
            let sampler = Sampler(topK: filter.topK, topP: filter.topP)
            XCTAssertEqual(sampler.keptMask(logits: filter.logits.floats), filter.kept, filter.name)
        }
    }

    func testInverseCDFPicksTheSameTokens() throws {
        let fixture = try Fixtures.load(SamplingFixture.self, "sampling.json")
        for filter in fixture.filters {
            let sampler = Sampler(topK: filter.topK, topP: filter.topP)
            let picked = filter.uniforms.map { sampler.sample(logits: filter.logits.floats, uniform: Float($0)) }
            XCTAssertEqual(picked, filter.indices, filter.name)
        }
    }

    func testWholeScaleStepMatchesPython() throws {
        let fixture = try Fixtures.load(SamplingFixture.self, "sampling.json")
        for scale in fixture.scales {
            let tokens = scale.patch * scale.patch
            let sampler = Sampler(topK: scale.topK, topP: scale.topP)
            let uniforms = SplitMix64Uniforms.scaleUniforms(
                seed: try Fixtures.hex(scale.seed), scaleIndex: scale.scaleIndex, batch: scale.batch, tokens: tokens,
                firstSample: scale.firstSample)
            let ratio: Double? = scale.cfg == 0 ? nil
                : Sampler.guidanceRatio(cfg: scale.cfg, scaleIndex: scale.scaleIndex, numScales: scale.numScales)
            let drawn = sampler.sampleScale(logits: scale.logits.flatMap { $0 }.floats, batch: scale.batch,
                                            tokens: tokens, vocab: scale.vocab, guidanceRatio: ratio, uniforms: uniforms)
            XCTAssertEqual(drawn.map { Int($0) }, scale.indices.flatMap { $0 }, scale.name)
        }
    }

    func testMaskedTokensAreNeverDrawn() {
        let sampler = Sampler(topK: 2)
        let logits: [Float] = [1, 5, 3, 4, 2]
        for u in stride(from: Float(0), to: 1, by: 0.01) {
            XCTAssertTrue([1, 3].contains(sampler.sample(logits: logits, uniform: u)))
        }
    }
}
