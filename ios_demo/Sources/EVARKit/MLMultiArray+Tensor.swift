// Moving values between Swift arrays and Core ML multi-arrays of any element type and layout.
//
// Outputs of Neural Engine computations can be padded (strides larger than the row-major ones), so
// every copy here walks the array's strides rather than assuming a dense buffer.

#if canImport(CoreML)
import CoreML
import Foundation

extension MLMultiArray {
    /// A zero-filled array for a manifest tensor of concrete `shape`.
    static func evarMake(shape: [Int], dtype: Manifest.DType) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: dtype.multiArrayType())
        try array.evarFill(floats: [Float](repeating: 0, count: shape.reduce(1, *)))
        return array
    }

    var evarShape: [Int] { shape.map { $0.intValue } }

    /// This array when it already holds `dtype`'s element type (passed on without a copy, the usual
    /// case for f_hat and KV between scales), else a converted copy.
    func evarConverted(to dtype: Manifest.DType) throws -> MLMultiArray {
        let type = try dtype.multiArrayType()
        if dataType == type {
            return self
        }
        let copy = try MLMultiArray(shape: shape, dataType: type)
        try copy.evarFill(floats: evarFloats())
        return copy
    }

    var evarCount: Int { evarShape.reduce(1, *) }

    /// The first `rows` entries along axis 0 (this array when that is all of it, else a copy of the same element
    /// type): the conditional rows [0, B) of a 2B-row KV cache at the CFG-trimming scale.
    func evarRows(_ rows: Int) throws -> MLMultiArray {
        let shape = evarShape
        guard let first = shape.first, rows >= 0, rows <= first else {
            throw EVARError.badOutput("cannot keep \(rows) rows of an array of shape \(shape)")
        }
        if rows == first {
            return self
        }
        let perRow = shape.dropFirst().reduce(1, *)
        let values = try evarFloats()
        let copy = try MLMultiArray(shape: ([rows] + shape.dropFirst()).map { NSNumber(value: $0) }, dataType: dataType)
        try copy.evarFill(floats: Array(values[0..<(rows * perRow)]))
        return copy
    }

    /// Calls `body(linearIndex, storageOffset)` for every element in row-major order.
    static func evarWalk(shape: [Int], strides: [Int], _ body: (Int, Int) -> Void) {
        let count = shape.reduce(1, *)
        guard count > 0 else { return }
        var contiguous = true
        var expected = 1
        for axis in stride(from: shape.count - 1, through: 0, by: -1) {
            if shape[axis] > 1 && strides[axis] != expected { contiguous = false }
            expected *= shape[axis]
        }
        if contiguous {
            for i in 0..<count { body(i, i) }
            return
        }
        var index = [Int](repeating: 0, count: shape.count)
        var offset = 0
        for linear in 0..<count {
            body(linear, offset)
            var axis = shape.count - 1
            while axis >= 0 {
                index[axis] += 1
                offset += strides[axis]
                if index[axis] < shape[axis] { break }
                offset -= strides[axis] * shape[axis]
                index[axis] = 0
                axis -= 1
            }
        }
    }

    /// Overwrites every element (row-major `values`), converting to the array's element type.
    func evarFill(floats values: [Float]) throws {
        guard values.count == evarCount else {
            throw EVARError.invalidConfiguration("\(values.count) values for an array of shape \(evarShape)")
        }
        let type = dataType
        let shape = evarShape
        try withUnsafeMutableBytes { raw, strides in
            switch type {
            case .float32:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    raw.storeBytes(of: values[i], toByteOffset: offset * 4, as: Float.self)
                }
            case .float16:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    raw.storeBytes(of: HalfPrecision.bits(from: values[i]), toByteOffset: offset * 2, as: UInt16.self)
                }
            case .double:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    raw.storeBytes(of: Double(values[i]), toByteOffset: offset * 8, as: Double.self)
                }
            case .int32:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    raw.storeBytes(of: Self.evarInt32(values[i]), toByteOffset: offset * 4, as: Int32.self)
                }
            default:
                throw EVARError.unsupportedArtifact("multi-array element type \(type.rawValue)")
            }
        }
    }

    /// Overwrites every element with integers (labels, token indices).
    func evarFill(integers values: [Int32]) throws {
        if dataType == .int32 {
            guard values.count == evarCount else {
                throw EVARError.invalidConfiguration("\(values.count) values for an array of shape \(evarShape)")
            }
            let shape = evarShape
            withUnsafeMutableBytes { raw, strides in
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    raw.storeBytes(of: values[i], toByteOffset: offset * 4, as: Int32.self)
                }
            }
        } else {
            try evarFill(floats: values.map { Float($0) })
        }
    }

    /// Every element as Float, row-major, whatever the element type and strides.
    func evarFloats() throws -> [Float] {
        let type = dataType
        let shape = evarShape
        let strides = self.strides.map { $0.intValue }
        var out = [Float](repeating: 0, count: evarCount)
        try withUnsafeBytes { raw in
            switch type {
            case .float32:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    out[i] = raw.load(fromByteOffset: offset * 4, as: Float.self)
                }
            case .float16:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    out[i] = HalfPrecision.float(fromBits: raw.load(fromByteOffset: offset * 2, as: UInt16.self))
                }
            case .double:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    out[i] = Float(raw.load(fromByteOffset: offset * 8, as: Double.self))
                }
            case .int32:
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    out[i] = Float(raw.load(fromByteOffset: offset * 4, as: Int32.self))
                }
            default:
                throw EVARError.badOutput("multi-array element type \(type.rawValue)")
            }
        }
        return out
    }

    /// Every element as Int32 (token indices), row-major.
    func evarIntegers() throws -> [Int32] {
        if dataType == .int32 {
            let shape = evarShape
            let strides = self.strides.map { $0.intValue }
            var out = [Int32](repeating: 0, count: evarCount)
            withUnsafeBytes { raw in
                Self.evarWalk(shape: shape, strides: strides) { i, offset in
                    out[i] = raw.load(fromByteOffset: offset * 4, as: Int32.self)
                }
            }
            return out
        }
        return try evarFloats().map { Self.evarInt32($0.rounded()) }
    }

    /// `Int32(x)` without its traps: NaN → 0, values beyond Int32 (±inf included) → the nearest end.
    /// A float output read as integers (a NaN from a diverged graph) must fail visibly, not crash.
    static func evarInt32(_ x: Float) -> Int32 {
        if x.isNaN { return 0 }
        if x >= 2_147_483_520 { return Int32.max }  // the largest Float below 2³¹; Int32(2³¹) traps
        if x <= -2_147_483_648 { return Int32.min }
        return Int32(x)
    }
}

extension Manifest.DType {
    /// The Core ML element type for this manifest dtype. Core ML has no 64-bit integer arrays:
    /// coremltools turns int64 inputs and outputs into int32, so int64 maps to int32 here.
    func multiArrayType() throws -> MLMultiArrayDataType {
        switch self {
        case .float32: return .float32
        case .float16: return .float16
        case .int32, .int64: return .int32
        case .bool: throw EVARError.unsupportedArtifact("bool tensors have no Core ML multi-array type")
        }
    }
}
#endif
