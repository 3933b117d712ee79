"""ios_demo checks that run without a Swift toolchain.

- every Swift file parses with a real Swift grammar (tree-sitter-swift), with a negative control;
- EVARKit's `Manifest` types match evar/contract/manifest.schema.json key for key (read from the Swift source);
- the shared fixtures equal what ios_demo/scripts/make_fixtures.py builds now, and agree with the
  Python runtime (evar.rng, evar.models.sampling); the XCTest target reads the same files on macOS;
- the bench JSON fields of BenchReport.swift are the ones ios_demo/README.md documents.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from evar import rng

ts = pytest.importorskip("tree_sitter")
tree_sitter_swift = pytest.importorskip("tree_sitter_swift")

ROOT = Path(__file__).resolve().parents[1]
IOS = ROOT / "ios_demo"
FIXTURES = IOS / "Tests" / "Fixtures"
SCHEMA_PATH = ROOT / "evar" / "contract" / "manifest.schema.json"
KIT = IOS / "Sources" / "EVARKit"


@pytest.fixture(scope="module")
def parser():
    return ts.Parser(ts.Language(tree_sitter_swift.language()))


def syntax_errors(parser, source: bytes) -> list[str]:
    """ERROR and MISSING nodes of a parse, as 'line:col text'."""
    found: list[str] = []
    stack = [parser.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            row, col = node.start_point
            found.append(f"{row + 1}:{col + 1} {node.text[:60]!r}")
        stack.extend(node.children)
    return found


# ---------------------------------------------------------------------------------------------
# Swift syntax


def swift_files() -> list[Path]:
    return sorted(IOS.rglob("*.swift"))


def test_every_swift_file_parses(parser):
    files = swift_files()
    assert len(files) >= 25, f"expected the package, tests, CLI and app sources, found {len(files)}"
    broken = {str(f.relative_to(ROOT)): errs for f in files if (errs := syntax_errors(parser, f.read_bytes()))}
    assert not broken, f"Swift syntax errors: {broken}"


@pytest.mark.parametrize("snippet", [
    b"func f( { let = }",
    b"struct A { var x: Int = }",
    b"let x = [1, 2,",
    b"enum E: String { case a = }",
    b"if x { print(1) ",
])
def test_the_parser_detects_broken_swift(parser, snippet):
    assert syntax_errors(parser, snippet), "negative control: a broken snippet must not parse cleanly"


def test_the_parser_accepts_the_constructs_evarkit_uses(parser):
    ok = b"""
    @available(iOS 18.0, macOS 15.0, *)
    func f(_ m: MLModel) async throws -> UInt64 {
        guard #available(iOS 18.0, *) else { throw E.x }
        let z = (UInt64(1) &+ 2) &* 0x9E37_79B9_7F4A_7C15
        if let state = kvState as? MLState { return z }
        return try await g(m, stateful: true)
    }
    """
    assert syntax_errors(parser, ok) == []


# ---------------------------------------------------------------------------------------------
# Swift declarations, read with the parser


@dataclass
class SwiftProperty:
    name: str
    key: str  # the JSON key (CodingKeys raw value, else the property name)
    type_text: str
    optional: bool


@dataclass
class SwiftType:
    name: str
    kind: str  # struct | enum | class
    schema: str | None
    properties: dict[str, SwiftProperty] = field(default_factory=dict)  # by JSON key
    cases: list[tuple[str, str]] = field(default_factory=list)  # enum (case name, raw value)


def _unquote(name: str) -> str:
    return name.strip("`")


def _enum_entries(body) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for entry in (c for c in body.children if c.type == "enum_entry"):
        for child in entry.children:
            if child.type == "simple_identifier":
                name = _unquote(child.text.decode())
                entries.append((name, name))
            elif child.type == "line_string_literal" and entries:
                entries[-1] = (entries[-1][0], child.text.decode().strip('"'))
    return entries


def _doc_schema(node) -> str | None:
    """The `Schema: <pointer>` line of the comments right above a declaration."""
    sibling = node.prev_sibling
    while sibling is not None and sibling.type in ("comment", "multiline_comment"):
        match = re.search(r"Schema:\s*(\S+)", sibling.text.decode())
        if match:
            return match.group(1)
        sibling = sibling.prev_sibling
    return None


def _stored_properties(body) -> list[tuple[str, str, bool]]:
    props = []
    for decl in (c for c in body.children if c.type == "property_declaration"):
        modifiers = next((c for c in decl.children if c.type == "modifiers"), None)
        if modifiers is not None and b"static" in modifiers.text:
            continue
        if any(c.type == "computed_property" for c in decl.children):
            continue
        pattern = next(c for c in decl.children if c.type == "pattern")
        annotation = next((c for c in decl.children if c.type == "type_annotation"), None)
        assert annotation is not None, f"stored property {pattern.text!r} needs a type annotation"
        type_node = annotation.named_children[0]
        props.append((_unquote(pattern.text.decode()), type_node.text.decode(), type_node.type == "optional_type"))
    return props


def swift_types(paths: list[Path], parser) -> dict[str, SwiftType]:
    types: dict[str, SwiftType] = {}
    for path in paths:
        stack = [parser.parse(path.read_bytes()).root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.type != "class_declaration":
                continue
            kind = node.children[0].type if node.children[0].type != "modifiers" else node.children[1].type
            name_node = node.child_by_field_name("name")
            if kind not in ("struct", "enum", "class") or name_node is None:
                continue
            name = name_node.text.decode()
            body = next(c for c in node.children if c.type in ("class_body", "enum_class_body"))
            swift = SwiftType(name, kind, _doc_schema(node))
            if kind == "enum":
                swift.cases = _enum_entries(body)
            else:
                keys_enum = next((c for c in body.children if c.type == "class_declaration"
                                  and c.child_by_field_name("name") is not None
                                  and c.child_by_field_name("name").text == b"CodingKeys"), None)
                keys = dict(_enum_entries(next(c for c in keys_enum.children if c.type == "enum_class_body"))) \
                    if keys_enum is not None else {}
                for prop, type_text, optional in _stored_properties(body):
                    key = keys.get(prop, prop) if keys_enum is not None else prop
                    assert keys_enum is None or prop in keys, f"{name}.{prop} has no CodingKeys case"
                    swift.properties[key] = SwiftProperty(prop, key, type_text, optional)
            if name != "CodingKeys":
                assert name not in types, f"Swift type {name} declared twice"
                types[name] = swift
    return types


# ---------------------------------------------------------------------------------------------
# Manifest ⇄ schema


class Schema:
    def __init__(self, data: dict):
        self.data = data

    def pointer(self, ref: str) -> dict:
        assert ref.startswith("#"), ref
        node = self.data
        for part in [p for p in ref[1:].split("/") if p]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return self.follow(node)

    def follow(self, node: dict) -> dict:
        while isinstance(node, dict) and "$ref" in node:
            node = self.pointer(node["$ref"])
        return node


def _types_of(node: dict) -> set[str]:
    t = node.get("type")
    if "const" in node:
        const = node["const"]
        return {"boolean" if isinstance(const, bool) else "integer" if isinstance(const, int) else "string"}
    if t is None:
        return set()
    return set(t) if isinstance(t, list) else {t}


def _strip_optional(type_text: str) -> str:
    return type_text[:-1] if type_text.endswith("?") else type_text


def _bare(type_text: str) -> str:
    return type_text.split(".")[-1].strip()


PRIMITIVES = {"integer": {"Int", "UInt64"}, "number": {"Double"}, "boolean": {"Bool"}, "string": {"String"}}


def check_against_schema(swift: SwiftType, node: dict, schema: Schema, types: dict[str, SwiftType],
                         path: str, problems: list[str]) -> None:
    props = node.get("properties", {})
    required = set(node.get("required", []))
    missing, extra = set(props) - set(swift.properties), set(swift.properties) - set(props)
    if missing:
        problems.append(f"{swift.name} ({path}) lacks schema keys {sorted(missing)}")
    if extra:
        problems.append(f"{swift.name} ({path}) has keys the schema does not declare {sorted(extra)}")
    for key in sorted(set(props) & set(swift.properties)):
        prop = swift.properties[key]
        sub = schema.follow(props[key])
        nullable = "null" in _types_of(sub)
        if key in required and prop.optional and not nullable:
            problems.append(f"{swift.name}.{prop.name}: required key '{key}' is Optional in Swift")
        if key not in required and not prop.optional:
            problems.append(f"{swift.name}.{prop.name}: optional key '{key}' must be Optional in Swift")
        check_value(f"{swift.name}.{prop.name}", _strip_optional(prop.type_text), sub, schema, types,
                    f"{path}/properties/{key}", problems)


def check_value(where: str, type_text: str, node: dict, schema: Schema, types: dict[str, SwiftType], path: str,
                problems: list[str]) -> None:
    kinds = _types_of(node) - {"null"}
    type_text = type_text.strip()
    if "array" in kinds:
        match = re.fullmatch(r"\[(.+)\]", type_text)
        if not match or ":" in match.group(1):
            problems.append(f"{where}: schema array at {path}, Swift type {type_text}")
            return
        check_value(where + "[]", match.group(1), schema.follow(node.get("items", {})), schema, types,
                    path + "/items", problems)
        return
    if "object" in kinds and "properties" not in node:
        match = re.fullmatch(r"\[\s*String\s*:\s*(.+)\]", type_text)
        if not match:
            problems.append(f"{where}: free-form object at {path}, Swift type {type_text} (want [String: ...])")
            return
        values = node.get("additionalProperties")
        if isinstance(values, dict) and values:
            check_value(where + "[key]", match.group(1), schema.follow(values), schema, types,
                        path + "/additionalProperties", problems)
        elif _bare(match.group(1)) != "JSONValue":
            problems.append(f"{where}: values of a free-form object must be JSONValue, got {match.group(1)}")
        return
    if "properties" in node or "enum" in node or "oneOf" in node:
        target = types.get(_bare(type_text))
        if target is None or target.schema is None:
            problems.append(f"{where}: {type_text} must be a Swift type annotated `Schema: {path}`")
        elif schema.pointer(target.schema) is not node:
            problems.append(f"{where}: {type_text} is annotated {target.schema}, the value is at {path}")
        return
    allowed = set().union(*(PRIMITIVES.get(k, set()) for k in kinds)) if kinds else set()
    if allowed and _bare(type_text) not in allowed:
        problems.append(f"{where}: schema {sorted(kinds)} at {path}, Swift type {type_text}")


@pytest.fixture(scope="module")
def schema() -> Schema:
    if not SCHEMA_PATH.exists():
        pytest.fail(f"{SCHEMA_PATH} is missing: the export issue ships it and EVARKit's Manifest is checked against it")
    return Schema(json.loads(SCHEMA_PATH.read_text()))


@pytest.fixture(scope="module")
def manifest_types(parser) -> dict[str, SwiftType]:
    return swift_types(sorted(KIT.glob("Manifest*.swift")), parser)


def test_swift_manifest_matches_the_schema(schema, manifest_types):
    annotated = {n: t for n, t in manifest_types.items() if t.schema}
    assert annotated.get("Manifest") and annotated["Manifest"].schema == "#"
    # the Distilled Decoding manifest has its own node (and Swift type), checked the same way
    assert annotated.get("FewStepManifest") and annotated["FewStepManifest"].schema == "#/$defs/dd_manifest"
    problems: list[str] = []
    for swift in annotated.values():
        try:
            node = schema.pointer(swift.schema)
        except (KeyError, TypeError):
            problems.append(f"{swift.name}: `Schema: {swift.schema}` names no schema node")
            continue
        if swift.kind == "struct":
            check_against_schema(swift, node, schema, manifest_types, swift.schema, problems)
        elif "enum" in node:
            schema_values = {v for v in node["enum"] if v is not None}
            swift_values = {raw for _, raw in swift.cases}
            if schema_values != swift_values:
                problems.append(f"enum {swift.name}: Swift {sorted(swift_values)} vs schema {sorted(schema_values)}")
    assert not problems, "Swift Manifest and evar/contract/manifest.schema.json disagree:\n" + "\n".join(problems)


def test_the_schema_check_catches_drift(schema, manifest_types):
    """Negative control: a renamed key, a wrongly optional field and a missing enum case are all reported."""
    import copy

    drifted = copy.deepcopy(schema.data)
    drifted["$defs"]["file"]["properties"]["size"] = drifted["$defs"]["file"]["properties"].pop("bytes")
    drifted["$defs"]["kv_cache"]["required"].remove("head_dim")
    drifted["$defs"]["dtype"]["enum"].append("bfloat16")
    # the Distilled Decoding node drifts too: a renamed key, a key made optional, a new role, a new field
    few_step = drifted["$defs"]["few_step"]["properties"]
    few_step["default_steps"] = few_step.pop("default_t_list")
    few_step["passes"]["items"]["required"].remove("given_tokens")
    drifted["$defs"]["dd_tensor"]["properties"]["role"]["enum"].append("teacher_logits")
    drifted["$defs"]["dd_manifest"]["properties"]["teacher"] = {"type": "string"}
    drifted_schema = Schema(drifted)
    problems: list[str] = []
    for swift in (t for t in manifest_types.values() if t.schema):
        node = drifted_schema.pointer(swift.schema)
        if swift.kind == "struct":
            check_against_schema(swift, node, drifted_schema, manifest_types, swift.schema, problems)
        elif "enum" in node and {v for v in node["enum"] if v is not None} != {raw for _, raw in swift.cases}:
            problems.append(f"enum {swift.name}")
    text = "\n".join(problems)
    assert "size" in text and "bytes" in text
    assert "head_dim" in text
    assert "enum DType" in text
    assert "default_steps" in text and "default_t_list" in text
    assert "Pass.givenTokens: optional key 'given_tokens'" in text
    assert "enum PassTensorRole" in text
    assert "FewStepManifest (#/$defs/dd_manifest) lacks schema keys ['teacher']" in text


# ---------------------------------------------------------------------------------------------
# Fixtures


def load_fixture_script():
    spec = importlib.util.spec_from_file_location("ios_demo_make_fixtures", IOS / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return load_fixture_script().build_fixtures()


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_committed_fixtures_equal_a_fresh_build(built):
    committed = {p.name for p in FIXTURES.glob("*.json")}
    assert committed == set(built), "fixture files differ: run python ios_demo/scripts/make_fixtures.py"
    stale = [name for name, text in built.items() if (FIXTURES / name).read_text() != text]
    assert not stale, f"stale fixtures {stale}: run python ios_demo/scripts/make_fixtures.py"


def test_xctest_reads_every_fixture():
    swift_tests = "".join(p.read_text() for p in (IOS / "Tests" / "EVARKitTests").glob("*.swift"))
    unread = [p.name for p in FIXTURES.glob("*.json") if f'"{p.name}"' not in swift_tests]
    assert not unread, f"fixtures no XCTest reads: {unread}"


def test_rng_fixture_matches_evar_rng():
    data = fixture("rng.json")
    assert data["rng"] == rng.RNG_NAME
    for case in data["streams"]:
        seed, stream, start = int(case["seed"], 16), int(case["stream"], 16), case["start"]
        assert int(case["key"], 16) == int(rng.stream_key(seed, stream))
        u = rng.uniforms(seed, stream, len(case["uniforms"]), start=start)
        assert u.tolist() == case["uniforms"]
        assert [int(r, 16) >> 40 for r in case["raw"]] == case["bits24"]
        assert np.array_equal(np.asarray(case["bits24"], np.float32) * np.float32(2.0**-24), u)
    for case in data["scale_uniforms"]:
        u = rng.scale_uniforms(int(case["seed"], 16), case["scale_index"], case["batch"], case["tokens"],
                               case["first_sample"])
        assert u.tolist() == case["uniforms"]


def test_rng_fixture_raw_values_follow_the_documented_recipe():
    """The bit recipe of evar/rng.py's docstring, in plain Python ints: what the Swift port implements."""
    mask = 2**64 - 1

    def splitmix(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for case in fixture("rng.json")["streams"]:
        key = splitmix(splitmix(int(case["seed"], 16)) ^ int(case["stream"], 16))
        assert key == int(case["key"], 16)
        assert [splitmix((key + case["start"] + i) & mask) for i in range(len(case["raw"]))] == \
            [int(r, 16) for r in case["raw"]]


def test_sampling_fixture_matches_the_reference_sampler():
    import torch

    from evar.models.sampling import apply_cfg, cfg_ratio, filter_logits, sample_from_uniforms

    data = fixture("sampling.json")
    for case in data["filters"]:
        logits = torch.tensor(case["logits"], dtype=torch.float32)
        filtered = filter_logits(logits[None], case["top_k"], case["top_p"])
        assert torch.isfinite(filtered)[0].tolist() == case["kept"], case["name"]
        u = torch.tensor(case["uniforms"], dtype=torch.float32)
        assert sample_from_uniforms(filtered.expand(len(u), -1), u).tolist() == case["indices"], case["name"]
        assert case["min_margin"] > data["min_margin_required"]
    for case in data["cfg"]:
        t = cfg_ratio(case["cfg"], case["scale_index"], case["num_scales"])
        assert t == case["t"]
        combined = apply_cfg(torch.tensor(case["cond"]), torch.tensor(case["uncond"]), t)
        assert combined.tolist() == case["combined"]


def test_fixture_decisions_survive_a_plain_reimplementation():
    """The margins make the fixtures implementation-robust: the algorithm EVARKit's Sampler uses (sort-based
    top-k, Double running sums stored as Float, first CDF entry above u·total) reproduces every decision."""
    f32 = np.float32

    def softmax(values):
        top = max(values)
        e = [math.exp(float(f32(v - top))) for v in values]
        total = sum(e)
        return [f32(x / total) for x in e]

    def kept(logits, top_k, top_p):
        keep = list(range(len(logits)))
        if 0 < top_k < len(logits):
            kth = sorted(logits, reverse=True)[top_k - 1]
            keep = [i for i in keep if logits[i] >= kth]
        if top_p > 0:
            ascending = sorted(keep, key=lambda i: (logits[i], i))
            probs, running, dropped = softmax([logits[i] for i in ascending]), 0.0, set()
            for position, index in enumerate(ascending[:-1]):
                running += float(probs[position])
                if f32(running) <= f32(1 - top_p):
                    dropped.add(index)
            keep = [i for i in keep if i not in dropped]
        return keep

    def draw(logits, top_k, top_p, u):
        keep = kept(logits, top_k, top_p)
        running, cdf = 0.0, []
        for p in softmax([logits[i] for i in keep]):
            running += float(p)
            cdf.append(f32(running))
        threshold = f32(u) * cdf[-1]
        return next((keep[i] for i, c in enumerate(cdf) if c > threshold), len(logits) - 1)

    for case in fixture("sampling.json")["filters"]:
        logits = [f32(v) for v in case["logits"]]
        mask = [False] * len(logits)
        for i in kept(logits, case["top_k"], case["top_p"]):
            mask[i] = True
        assert mask == case["kept"], case["name"]
        assert [draw(logits, case["top_k"], case["top_p"], u) for u in case["uniforms"]] == case["indices"]


@pytest.mark.parametrize("name", ["manifest_tiny.json", "manifest_tiny_io.json", "manifest_tiny_ane.json",
                                  "manifest_tiny_split.json", "manifest_tiny_split_io.json"])
def test_tiny_manifests_are_valid(schema, name):
    jsonschema = pytest.importorskip("jsonschema")
    errors = sorted(jsonschema.Draft202012Validator(schema.data).iter_errors(fixture(name)), key=str)
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message[:120]}" for e in errors[:5])


def fed_input_roles(manifest_types: dict[str, SwiftType]) -> set[str]:
    """Roles that EVARPipeline.inputArray has a `case` for, as manifest role strings."""
    source = (KIT / "EVARPipeline+Scales.swift").read_text()
    body = source[source.index("func inputArray"):source.index("func outputArray")]
    raw = dict(manifest_types["TensorRole"].cases)
    return {raw[name] for name in re.findall(r"case\s+((?:\.\w+\?(?:,\s*)?)+):", body)
            for name in re.findall(r"\.(\w+)\?", name)}


@pytest.mark.parametrize("name", ["manifest_tiny.json", "manifest_tiny_io.json"])
def test_evarkit_binds_every_declared_tensor(manifest_types, name):
    """Every input the exporter declares has a role EVARPipeline feeds; the outputs it reads exist."""
    manifest = fixture(name)
    fed = fed_input_roles(manifest_types)
    assert {"labels", "f_hat", "uniforms", "cfg", "past_key", "past_value"} <= fed
    step = manifest["graphs"]["decoder_step"]["functions"]
    assert sorted(f["scale_index"] for f in step) == list(range(len(manifest["patch_nums"])))
    for function in step:
        assert {t.get("role") for t in function["inputs"]} <= fed, function["name"]
        assert {"idx", "f_hat"} <= {t.get("role") for t in function["outputs"]}, function["name"]
        if manifest["kv_cache"]["mode"] == "state":
            assert {t["role"] for t in function["states"]} == {"key_cache", "value_cache"}
    decoder = manifest["graphs"]["vqvae_decoder"]["functions"][0]
    assert [t["role"] for t in decoder["inputs"]] == ["f_hat"] and decoder["outputs"][0]["role"] == "image"


def test_statistics_fixture_is_numpy_percentile():
    for case in fixture("statistics.json")["cases"]:
        values = np.asarray(case["values"])
        assert case["median"] == float(np.percentile(values, 50)) and case["p90"] == float(np.percentile(values, 90))


# ---------------------------------------------------------------------------------------------
# Bench JSON fields: documented in the README, printed by BenchReport (and by evar-bench)


def documented_bench_fields() -> set[str]:
    text = (IOS / "README.md").read_text()
    match = re.search(r"<!-- bench-fields -->(.*?)<!-- /bench-fields -->", text, re.S)
    assert match, "ios_demo/README.md must document the bench JSON fields between bench-fields markers"
    return set(re.findall(r"^\|\s*`([^`]+)`", match.group(1), re.M))


def swift_bench_fields(parser) -> set[str]:
    types = swift_types([KIT / "BenchReport.swift"], parser)
    fields = set()
    for key, prop in types["BenchReport"].properties.items():
        fields.add(key)
        inner = _strip_optional(prop.type_text)
        is_array = inner.startswith("[")
        nested = types.get(_bare(inner.strip("[]")))
        # a nullable object (few_step) is one documented row: evar-bench writes it as null, so its keys are not
        # fields of every report
        if nested is not None and nested.kind == "struct" and not prop.optional:
            fields.update(f"{key}{'[]' if is_array else ''}.{sub}" for sub in nested.properties)
    return fields


def test_bench_report_fields_are_documented(parser):
    assert swift_bench_fields(parser) == documented_bench_fields()


def test_app_project_spec_points_at_real_sources():
    yaml = pytest.importorskip("yaml")
    app = IOS / "App"
    spec = yaml.safe_load((app / "project.yml").read_text())
    assert (app / spec["packages"]["EVARKit"]["path"] / "Package.swift").exists()
    target = spec["targets"]["EVARDemo"]
    assert target["type"] == "application" and {"package": "EVARKit", "product": "EVARKit"} in target["dependencies"]
    for source in target["sources"]:
        assert (app / source["path"]).is_dir(), source
    assert any(s.get("type") == "folder" and s["path"] == "Models" for s in target["sources"])
    assert "@main" in (app / "EVARDemo" / "EVARDemoApp.swift").read_text()


def test_evarkit_feeds_every_input_of_a_host_sampled_artifact(manifest_types):
    """Every input role of the host-sampled manifest has a `case` in EVARPipeline+HostSampling.swift, and the
    roles it reads exist (raw logits out of each step, next f_hat out of each fhat_update)."""
    manifest = fixture("manifest_tiny_ane.json")
    source = (KIT / "EVARPipeline+HostSampling.swift").read_text()
    raw = dict(manifest_types["TensorRole"].cases)
    fed = {raw[name] for name in re.findall(r"case\s+\.(\w+)\?:", source)}
    assert manifest["format_version"] == 2 and manifest["sampling"]["where"] == "host"
    for role in ("decoder_step", "fhat_update"):
        for function in manifest["graphs"][role]["functions"]:
            assert {t["role"] for t in function["inputs"]} <= fed, (role, function["name"])
    assert all(f["outputs"][0]["role"] == "raw_logits" for f in manifest["graphs"]["decoder_step"]["functions"])
    assert all(f["outputs"][0]["role"] == "f_hat" for f in manifest["graphs"]["fhat_update"]["functions"])


def test_bench_nulls_fixture_is_what_evar_bench_writes():
    from evar.runtime.bench import SWIFT_FIELDS

    report = fixture("bench_nulls.json")
    assert set(report) == set(SWIFT_FIELDS) and report["threads"] is None and report["stage_units"] is None


def test_image_fixture_non_finite_values_follow_to_uint8():
    import torch

    from evar.data import to_uint8_nhwc

    case = fixture("image.json")["non_finite"]
    values = torch.tensor([float(v) for v in case["inputs"]]).view(1, 3, 1, 1)
    assert to_uint8_nhwc(values)[0, 0, 0].tolist() == case["rgb"] == [0, 255, 0]


# ---------------------------------------------------------------------------------------------
# Distilled Decoding artifacts (family "dd") and the generation modes EVARKit refuses


def test_tiny_dd_manifest_is_what_the_exporter_validates():
    """The DD fixture passes evar.contract.validate (its own schema node, then the pass/graph structure)."""
    from evar.contract import validate

    manifest = fixture("manifest_tiny_dd.json")
    validate(manifest)
    assert manifest["family"] == "dd" and manifest["format_version"] == 3 and manifest["backend"] == "coreml"
    assert [p["t"] for p in manifest["few_step"]["passes"]] == [0, 2]


@pytest.mark.slow
def test_tiny_dd_manifest_is_what_evar_export_coreml_writes(tmp_path):
    """The DD fixture equals the manifest `evar-export coreml` writes for the same tiny student (batch 1, t-list
    0,2), but for what differs by nature: files (real packages), provenance (time, versions) and parity checks.
    About 30 s (two Core ML conversions)."""
    pytest.importorskip("coremltools")
    from evar.export.coreml import CoremlOptions
    from evar.export.dd_coreml import build_dd_coreml

    script = load_fixture_script()
    build_dd_coreml(script.tiny_dd_model(), "fixtures:tiny-dd", tmp_path / "art", CoremlOptions(batch=1),
                    script.DD_T_VALUES)
    real = json.loads((tmp_path / "art" / "manifest.json").read_text())
    committed = fixture("manifest_tiny_dd.json")
    for key in ("files", "provenance", "parity"):
        real.pop(key), committed.pop(key)
    assert real == committed


def test_dd_noise_fixture_matches_few_step():
    from evar.contract import few_step

    data = fixture("dd_noise.json")
    assert data["rng"] == rng.RNG_NAME and data["noise_stream"] == few_step.NOISE_STREAM
    for case in data["tokens"]:
        values = few_step.token_noise(int(case["seed"], 16), case["scale_index"], case["first_sample"], case["batch"],
                                      case["tokens"], case["dim"])
        assert values.reshape(-1).tolist() == case["values"]
        assert case["min_margin"] > data["min_margin_required"]
    for case in data["sequences"]:
        values = few_step.sequence_noise(int(case["seed"], 16), case["first_sample"], case["batch"],
                                         tuple(case["patch_nums"]), case["dim"])
        assert values.reshape(-1).tolist() == case["values"]
        assert case["min_margin"] > data["min_margin_required"]


def test_dd_noise_follows_the_recipe_evarkit_implements():
    """FewStepNoise.swift's recipe in plain Python (uniforms from the documented integer SplitMix64, one normal at
    a time with math.log1p / math.cos in double, one rounding to float32) reproduces every fixture value."""
    mask = 2**64 - 1

    def splitmix(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    data = fixture("dd_noise.json")
    for case in data["tokens"]:
        key = splitmix(splitmix(int(case["seed"], 16)) ^ (data["noise_stream"] + case["scale_index"]))
        per_sample = 2 * case["tokens"] * case["dim"]
        start = case["first_sample"] * per_sample

        def uniform(i: int) -> float:
            return (splitmix((key + start + i) & mask) >> 40) * 2.0**-24

        two_pi = 2.0 * math.pi
        values = [float(np.float32(math.sqrt(-2.0 * math.log1p(-uniform(2 * n))) * math.cos(two_pi * uniform(2 * n + 1))))
                  for n in range(len(case["values"]))]
        assert values == case["values"]


def test_evarkit_feeds_every_input_of_a_dd_artifact():
    """Every pass input role of the DD manifest has a `case` in FewStepPipeline.passInput, and every role the
    pipeline reads is declared: tokens, vectors, f_hat out of each pass; f_hat in, image out of the decoder."""
    manifest = fixture("manifest_tiny_dd.json")
    source = (KIT / "FewStepPipeline.swift").read_text()
    body = source[source.index("func passInput"):source.index("func passOutput")]
    raw = {"labels": "labels", "noise": "noise", "givenTokens": "given_tokens", "givenVectors": "given_vectors"}
    fed = {raw[name] for name in re.findall(r"case\s+\.(\w+):", body)}
    assert fed == set(raw.values())
    for p in manifest["few_step"]["passes"]:
        (function,) = manifest["graphs"][p["graph"]]["functions"]
        assert {t["role"] for t in function["inputs"]} <= fed, p
        assert {"tokens", "vectors", "f_hat"} <= {t["role"] for t in function["outputs"]}, p
        assert ("given_tokens" in {t["role"] for t in function["inputs"]}) == (p["t"] > 0)
    decoder = manifest["graphs"]["vqvae_decoder"]["functions"][0]
    assert [t["role"] for t in decoder["inputs"]] == ["f_hat"] and decoder["outputs"][0]["role"] == "image"


@pytest.mark.parametrize("name", ["manifest_tiny_split.json", "manifest_tiny_split_io.json"])
def test_evarkit_binds_every_tensor_of_a_split_and_trimmed_artifact(manifest_types, name):
    """Every input of every function the recipe runs (early, prefill, decoder_step, unguided) has a role
    EVARPipeline.inputArray feeds, and the loop's rules hold in the fixture: the unguided functions take no cfg
    and B rows, the prefill takes labels and the early tokens (idx), and with KV as inputs/outputs returns every
    layer's cache."""
    manifest = fixture(name)
    fed = fed_input_roles(manifest_types)
    assert {"idx", "labels"} <= fed
    for role, graph in manifest["graphs"].items():
        for function in graph["functions"]:
            assert {t.get("role") for t in function["inputs"]} <= fed, (role, function["name"])
    (prefill,) = manifest["graphs"]["prefill"]["functions"]
    assert [t["role"] for t in prefill["inputs"]] == ["labels", "idx"]
    presents = [t for t in prefill["outputs"] if t["role"] in ("present_key", "present_value")]
    depth = manifest["model"]["var"]["depth"]
    assert len(presents) == (2 * depth if manifest["kv_cache"]["mode"] == "io" else 1)
    for function in manifest["graphs"]["decoder_step_unguided"]["functions"]:
        assert "cfg" not in {t["role"] for t in function["inputs"]}
        assert [t["shape"][0] for t in function["inputs"] if t["role"] in ("labels", "past_key")] == \
            [1] * (1 + (depth if manifest["kv_cache"]["mode"] == "io" else 0))
    source = (KIT / "EVARPipeline+Scales.swift").read_text()
    for rule in ("manifest.splitScale", "manifest.cfgUntilScale", "evarRows", "earlyCache", "prefill(context)"):
        assert rule in source, rule


def test_evarkit_names_every_generation_mode_the_schema_has():
    """Each `generation` field belongs to a mode Manifest+GenerationModes.swift checks (so a mode added to the
    schema fails here until EVARKit refuses or runs it), and the split fixture uses the split and trimming."""
    source = (KIT / "Manifest+GenerationModes.swift").read_text()
    keys = json.loads(SCHEMA_PATH.read_text())["$defs"]["generation"]["properties"]
    swift = {prop.key: prop.name for prop in _generation_properties()}
    unchecked = [key for key in keys if f"generation.{swift[key]}" not in source]
    assert not unchecked, f"generation fields EVARKit neither runs nor refuses: {unchecked}"
    generation = fixture("manifest_tiny_split.json")["generation"]
    assert generation["split_scale"] is not None and generation["cfg_until_scale"] is not None


def _generation_properties():
    parser = ts.Parser(ts.Language(tree_sitter_swift.language()))
    return swift_types(sorted(KIT.glob("Manifest*.swift")), parser)["Generation"].properties.values()
