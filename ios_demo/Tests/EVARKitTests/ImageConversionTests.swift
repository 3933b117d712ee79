import XCTest
@testable import EVARKit

final class ImageConversionTests: XCTestCase {
    func testPixelsMatchToUint8NHWC() throws {
        let fixture = try Fixtures.load(ImageFixture.self, "image.json")
        let (batch, height, width) = (fixture.shape[0], fixture.shape[2], fixture.shape[3])
        let values = fixture.chw.flatMap { $0.flatMap { $0.flatMap { $0 } } }.floats
        let plane = 3 * height * width
        for sample in 0..<batch {
            let rgb = ImageConversion.rgbBytes(chw: values[(sample * plane)..<((sample + 1) * plane)],
                                               height: height, width: width)
            let expected = fixture.rgb[sample].flatMap { $0.flatMap { $0 } }.map { UInt8($0) }
            XCTAssertEqual(rgb, expected, "sample \(sample)")
        }
    }

    /// NaN, +inf and -inf (a diverged decoder) convert like Python, without trapping.
    func testNonFiniteValuesDoNotTrap() throws {
        let fixture = try Fixtures.load(ImageFixture.self, "image.json")
        let values = try fixture.nonFinite.inputs.map { try XCTUnwrap(Float($0), $0) }
        let rgb = ImageConversion.rgbBytes(chw: ArraySlice(values), height: 1, width: 1)
        XCTAssertEqual(rgb, fixture.nonFinite.rgb.map { UInt8($0) })
    }
}
