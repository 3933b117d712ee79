import XCTest
@testable import EVARKit

final class StatisticsTests: XCTestCase {
    func testPercentilesMatchNumpy() throws {
        let fixture = try Fixtures.load(StatisticsFixture.self, "statistics.json")
        for item in fixture.cases {
            let stats = Statistics(item.values)
            XCTAssertEqual(stats.median, item.median, accuracy: 1e-9, "\(item.values)")
            XCTAssertEqual(stats.p90, item.p90, accuracy: 1e-9, "\(item.values)")
            XCTAssertEqual(stats.min, item.min)
            XCTAssertEqual(stats.mean, item.mean, accuracy: 1e-9)
        }
    }
}
