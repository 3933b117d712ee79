// One screen: pick a model and a class, generate, see the image and the latency of every model.

import EVARKit
import SwiftUI
import UniformTypeIdentifiers

@MainActor
struct ContentView: View {
    @EnvironmentObject private var model: DemoModel
    @State private var importing = false

    var body: some View {
        NavigationStack {
            Form {
                Section("Model") {
                    Picker("Artifact", selection: $model.selection) {
                        ForEach(model.artifacts) { artifact in
                            Text(artifact.name).tag(Optional(artifact.id))
                        }
                    }
                    if let artifact = model.selected {
                        Text(artifact.summary).font(.footnote).foregroundStyle(.secondary)
                    }
                    Picker("Compute units", selection: $model.computeUnits) {
                        ForEach(ComputeUnits.allCases, id: \.self) { units in
                            Text(units.rawValue).tag(units)
                        }
                    }
                    Button("Import artifact folder…") { importing = true }
                }
                Section("Generation") {
                    Picker("Class", selection: $model.classLabel) {
                        ForEach(model.classChoices) { choice in
                            Text("\(choice.label) · \(choice.name)").tag(choice.label)
                        }
                    }
                    Stepper("Seed \(model.seed)", value: $model.seed, in: 0...UInt64(Int.max))
                    if let artifact = model.selected, !artifact.tListChoices.isEmpty {
                        // Distilled Decoding: how many student passes (no guidance: the student learnt it)
                        Picker("Steps", selection: stepsBinding(artifact)) {
                            ForEach(artifact.tListChoices, id: \.self) { tList in
                                Text(stepsLabel(tList)).tag(tList)
                            }
                        }
                    } else {
                        Stepper(String(format: "CFG %.1f", model.cfg), value: $model.cfg, in: 0...10, step: 0.5)
                    }
                    HStack {
                        Button("Generate") { Task { await model.generate() } }
                            .buttonStyle(.borderedProminent)
                        Spacer()
                        Button("Benchmark all") { Task { await model.benchmarkAll() } }
                    }
                    .disabled(model.isBusy || model.artifacts.isEmpty)
                }
                if let image = model.image {
                    Section("Image") {
                        Image(decorative: image, scale: 1)
                            .interpolation(.none)
                            .resizable()
                            .scaledToFit()
                            .frame(maxWidth: .infinity, maxHeight: 320)
                    }
                }
                Section("Latency on this device") {
                    LatencyPanel()
                }
                Section {
                    Text(model.status).font(.footnote).foregroundStyle(.secondary)
                }
            }
            .navigationTitle("EVAR")
        }
        .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
            model.importArtifact(result)
        }
    }

    /// The t-list picked for a Distilled Decoding artifact.
    private func stepsBinding(_ artifact: Artifact) -> Binding<[Int]> {
        Binding(get: { model.tList(for: artifact) ?? [0] }, set: { model.tLists[artifact.id] = $0 })
    }

    /// e.g. "1 step", "2 steps (t = 0, 3)"
    private func stepsLabel(_ tList: [Int]) -> String {
        let steps = tList.count == 1 ? "1 step" : "\(tList.count) steps"
        return tList.count == 1 ? steps : steps + " (t = " + tList.map(String.init).joined(separator: ", ") + ")"
    }
}
