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
    }
}
