import XCTest
@testable import EVARKit

final class BenchReportTests: XCTestCase {
    func testReportSummarisesRuns() throws {
        let manifest = try Manifest.decode(Fixtures.data("manifest_tiny_io.json"))
        let scales = manifest.patchNums.count
        let runs = (1...5).map { run in
            StageTimings(scaleMilliseconds: [Double](repeating: Double(run), count: scales),
                         decodeMilliseconds: 2 * Double(run), endToEndMilliseconds: 10 * Double(run))
        }
        let report = BenchReport(manifest: manifest, artifactName: "tiny", configuration: GenerationConfiguration(),
                                 runs: runs, warmup: 2, loadMs: 12.5, tool: "tests", device: "test", os: "test")
        XCTAssertEqual(report.iterations, 5)
        XCTAssertEqual(report.perScale.count, scales)
        XCTAssertEqual(report.perScale[0].medianMs, 3)
        XCTAssertEqual(report.decode.medianMs, 6)
        XCTAssertEqual(report.endToEnd.minMs, 10)
        XCTAssertEqual(report.endToEnd.p90Ms, 46, accuracy: 1e-9)
        XCTAssertEqual(report.params, manifest.model.transformer.parameterCount)
        XCTAssertEqual(report.topK, manifest.sampling.topK)

        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: report.jsonData()) as? [String: Any])
        XCTAssertEqual(json["format"] as? String, BenchReport.formatName)
        XCTAssertNotNil(json["per_scale"] as? [[String: Any]])
        XCTAssertNotNil((json["end_to_end"] as? [String: Any])?["p90_ms"])
        // optional fields are written as null, never left out (the contract evar-bench follows too)
        XCTAssertTrue(json["threads"] is NSNull)
        XCTAssertTrue(json["stage_units"] is NSNull)
        XCTAssertTrue(json["few_step"] is NSNull)
    }

    /// A report evar-bench wrote with null optional fields reads, and writes back the same keys and nulls.
    func testNullFieldsRoundTrip() throws {
        let data = try Fixtures.data("bench_nulls.json")
        let report = try JSONDecoder().decode(BenchReport.self, from: data)
        XCTAssertNil(report.threads)
        XCTAssertNil(report.stageUnits)
        let original = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        let written = try XCTUnwrap(JSONSerialization.jsonObject(with: report.jsonData()) as? [String: Any])
        XCTAssertEqual(Set(written.keys), Set(original.keys))
        XCTAssertTrue(written["threads"] is NSNull)
        XCTAssertTrue(written["stage_units"] is NSNull)
        XCTAssertTrue(written["few_step"] is NSNull)
    }

    func testHostSampledReportNamesTheUnitsOfEachStage() throws {
        let manifest = try Manifest.decode(Fixtures.data("manifest_tiny_ane.json"))
        let runs = [StageTimings(scaleMilliseconds: [Double](repeating: 1, count: manifest.patchNums.count),
                                 decodeMilliseconds: 1, endToEndMilliseconds: 5)]
        let report = BenchReport(manifest: manifest, artifactName: "tiny-ane", configuration: GenerationConfiguration(),
                                 runs: runs, warmup: 0, loadMs: 1, tool: "tests", device: "test", os: "test")
        XCTAssertEqual(report.sampling, "host")
        XCTAssertEqual(report.stageUnits?["fhat_update"], "cpuOnly")
        XCTAssertEqual(report.stageUnits?["decoder_step"], "cpuAndNeuralEngine")
    }

    /// A Distilled Decoding run: its passes in `few_step`, no scales, the student's parameters.
    func testFewStepReportTimesEachPass() throws {
        let manifest = try FewStepManifest.decode(Fixtures.data("manifest_tiny_dd.json"))
        let runs = (1...3).map { run in
            StageTimings(decodeMilliseconds: 1, endToEndMilliseconds: 10 * Double(run),
                         passMilliseconds: [Double(run), 2 * Double(run)])
        }
        let report = try BenchReport(fewStep: manifest, tList: [0, 2], artifactName: "tiny-dd",
                                     configuration: GenerationConfiguration(), runs: runs, warmup: 1, loadMs: 3,
                                     tool: "tests", device: "test", os: "test")
        XCTAssertEqual(report.perScale, [])
        XCTAssertEqual(report.fewStep?.tList, [0, 2])
        XCTAssertEqual(report.fewStep?.perPass.map(\.graph), ["dd_pass_t0", "dd_pass_t2"])
        XCTAssertEqual(report.fewStep?.perPass[1].medianMs, 4)
        XCTAssertEqual(report.params, manifest.studentParameterCount)
        XCTAssertEqual(report.kvCache, "none")
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: report.jsonData()) as? [String: Any])
        let fewStep = try XCTUnwrap(json["few_step"] as? [String: Any])
        XCTAssertEqual(fewStep["t_list"] as? [Int], [0, 2])
        XCTAssertThrowsError(try BenchReport(fewStep: manifest, tList: [0], artifactName: "tiny-dd",
                                             configuration: GenerationConfiguration(), runs: runs, warmup: 1,
                                             loadMs: 3, tool: "tests"))
    }
}
