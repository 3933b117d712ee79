// IEEE binary16 conversion without Swift's `Float16` type, which does not exist on Intel Macs.
// Core ML graphs exported at fp16 take and return float16 arrays. Round to nearest, ties to even, as
// numpy's astype(float16) (Tests/Fixtures/float16.json).

/// Conversions between `Float` and the bit pattern of an IEEE half-precision number.
public enum HalfPrecision {
    /// The half nearest to `value` (ties to even); beyond ±65504 rounds to ±infinity.
    public static func bits(from value: Float) -> UInt16 {
        let f = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (f >> 16) & 0x8000)
        let exponent = Int((f >> 23) & 0xFF)
        let mantissa = f & 0x7F_FFFF
        if exponent == 0xFF {  // infinity or NaN (kept quiet)
            return sign | 0x7C00 | (mantissa != 0 ? 0x0200 : 0)
        }
        let halfExponent = exponent - 127 + 15
        if halfExponent >= 0x1F {
            return sign | 0x7C00
        }
        if halfExponent <= 0 {
            // Subnormal half: the value in units of 2^-24, from the significand with its implicit bit.
            if halfExponent < -10 {
                return sign
            }
            let significand = mantissa | 0x80_0000
            let shift = UInt32(14 - halfExponent)  // 14 ... 24
            return sign | UInt16(truncatingIfNeeded: roundShift(significand, by: shift))
        }
        let normal = (UInt32(halfExponent) << 10) | (mantissa >> 13)
        let remainder = mantissa & 0x1FFF
        // A carry out of the mantissa correctly bumps the exponent (and reaches infinity at the top).
        let rounded = remainder > 0x1000 || (remainder == 0x1000 && normal & 1 == 1) ? normal + 1 : normal
        return sign | UInt16(truncatingIfNeeded: rounded)
    }

    /// `value >> shift`, rounded to nearest with ties to even.
    static func roundShift(_ value: UInt32, by shift: UInt32) -> UInt32 {
        let quotient = value >> shift
        let remainder = value & ((1 << shift) - 1)
        let halfway: UInt32 = 1 << (shift - 1)
        if remainder > halfway || (remainder == halfway && quotient & 1 == 1) {
            return quotient + 1
        }
        return quotient
    }

    /// The exact `Float` value of a half.
    public static func float(fromBits bits: UInt16) -> Float {
        let sign = UInt32(bits & 0x8000) << 16
        let exponent = UInt32((bits >> 10) & 0x1F)
        let mantissa = UInt32(bits & 0x03FF)
        if exponent == 0 {
            let magnitude = Float(mantissa) * 0x1p-24
            return sign != 0 ? -magnitude : magnitude
        }
        if exponent == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        }
        return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
    }
}
