import XCTest
@testable import EVARKit

final class HalfPrecisionTests: XCTestCase {
    func testConversionsMatchNumpy() throws {
        let fixture = try Fixtures.load(Float16Fixture.self, "float16.json")
        for item in fixture.cases {
            XCTAssertEqual(HalfPrecision.bits(from: Float(item.float)), item.halfBits, "\(item.float)")
            let back = HalfPrecision.float(fromBits: item.halfBits)
            if let expected = item.back {
                XCTAssertEqual(back, Float(expected))
                XCTAssertEqual(back.sign, Float(item.float).sign)
            } else {
                XCTAssertTrue(back.isInfinite)
            }
        }
        for item in fixture.decodeOnly {
            XCTAssertEqual(HalfPrecision.float(fromBits: item.halfBits), Float(item.back))
        }
    }

    func testEveryHalfRoundTrips() {
        var failures: [UInt16] = []
        for bits in UInt16.min...UInt16.max {
            let value = HalfPrecision.float(fromBits: bits)
            if !value.isNaN && HalfPrecision.bits(from: value) != bits {
                failures.append(bits)
            }
        }
        XCTAssertEqual(failures, [])
    }
}
