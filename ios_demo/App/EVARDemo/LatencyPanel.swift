// Latency of every artifact measured in this session, with the speed-up over the dense baseline.

import EVARKit
import SwiftUI

@MainActor
struct LatencyPanel: View {
    @EnvironmentObject private var model: DemoModel

    var body: some View {
        if model.latency.isEmpty {
            Text("Generate or benchmark to measure.").foregroundStyle(.secondary)
        } else {
            Grid(alignment: .trailing, horizontalSpacing: 12, verticalSpacing: 6) {
                GridRow {
                    Text("model").gridColumnAlignment(.leading)
                    Text("params")
                    Text("median")
                    Text("p90")
                    Text("decode")
                    Text("speed-up")
                }
                .font(.caption.bold())
                ForEach(model.artifacts) { artifact in
                    if let summary = model.latency[artifact.id], let total = summary.endToEnd {
                        GridRow {
                            Text(artifact.name).gridColumnAlignment(.leading)
                            Text(String(format: "%.1fM", Double(artifact.parameterCount) / 1e6))
                            Text(milliseconds(total.median))
                            Text(milliseconds(total.p90))
                            Text(summary.decode.map { milliseconds($0.median) } ?? "–")
                            Text(speedup(of: total.median))
                        }
                        .font(.caption.monospacedDigit())
                    }
                }
            }
            if let selected = model.selected, let perScale = model.latency[selected.id]?.perScaleMedians,
               !perScale.isEmpty {
                Text("per scale (\(selected.name)): " + perScale.map { String(format: "%.1f", $0) }.joined(separator: " · ")
                     + " ms")
                    .font(.caption2)
                    .foregroundStyle(.secondary)
            }
            if let selected = model.selected, let perPass = model.latency[selected.id]?.perPassMedians,
               !perPass.isEmpty {
                Text("per pass (\(selected.name)): " + perPass.map { String(format: "%.1f", $0) }.joined(separator: " · ")
                     + " ms")
                    .font(.caption2)
                    .foregroundStyle(.secondary)
            }
        }
    }

    private func milliseconds(_ value: Double) -> String {
        String(format: "%.1f ms", value)
    }

    private func speedup(of median: Double) -> String {
        guard let baseline = model.baseline, let reference = model.latency[baseline.id]?.endToEnd?.median,
              median > 0 else { return "–" }
        return String(format: "%.2f×", reference / median)
    }
}
