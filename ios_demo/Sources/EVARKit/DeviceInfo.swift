// Which machine a measurement comes from: the hardware identifier (e.g. iPad16,3) says more than
// a marketing name, and the chip name on a Mac says what ran it.

import Foundation

/// The hardware and OS of this device, for bench reports.
public enum DeviceInfo {
    /// `iPad16,3`, or on a Mac `Mac14,2 (Apple M2)`.
    public static var model: String {
        #if os(macOS)
        let identifier = sysctlString("hw.model") ?? machine
        if let chip = sysctlString("machdep.cpu.brand_string") {
            return "\(identifier) (\(chip))"
        }
        return identifier
        #else
        return machine
        #endif
    }

    /// E.g. `iOS Version 18.1 (Build 22B83)`.
    public static var operatingSystem: String {
        #if os(macOS)
        let name = "macOS"
        #elseif os(iOS)
        let name = "iOS"
        #else
        let name = "OS"
        #endif
        return "\(name) \(ProcessInfo.processInfo.operatingSystemVersionString)"
    }

    /// `uname -m`: the model identifier on iOS devices, the architecture on Macs and simulators.
    static var machine: String {
        var info = utsname()
        uname(&info)
        return withUnsafeBytes(of: &info.machine) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    #if os(macOS)
    static func sysctlString(_ name: String) -> String? {
        var size = 0
        guard sysctlbyname(name, nil, &size, nil, 0) == 0, size > 0 else { return nil }
        var bytes = [UInt8](repeating: 0, count: size)
        guard sysctlbyname(name, &bytes, &size, nil, 0) == 0 else { return nil }
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }
    #endif
}
