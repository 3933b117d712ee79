// EVAR demo: generate images on device from exported EVAR artifacts (dense and pruned side by side)
// and compare their on-device latency.

import SwiftUI

@main
@MainActor
struct EVARDemoApp: App {
    @StateObject private var model = DemoModel()

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(model)
                .task { await model.refreshArtifacts() }
        }
    }
}
