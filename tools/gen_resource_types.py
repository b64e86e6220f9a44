#!/usr/bin/env python3
"""Generate src/fhir/resource_types.rs from the FHIR R4 (4.0.1) specification.

Python 3 standard library only.

Usage (from the repository root), with PACKAGE_DIR an unpacked copy of the
official hl7.fhir.r4.core 4.0.1 package (see tools/fhir-r4/SOURCE.md):

    python3 tools/gen_resource_types.py PACKAGE_DIR          # (re)write src/fhir/resource_types.rs
    python3 tools/gen_resource_types.py --check PACKAGE_DIR  # exit 1 if the .rs file is stale

The input is every StructureDefinition with kind = "resource" in the package,
plus the codes of the CodeSystem http://hl7.org/fhir/resource-types as an
independent cross-check.

A REST resource type is a StructureDefinition with kind = "resource",
derivation = "specialization" and abstract = false. That excludes the abstract
`Resource` (which has no derivation) and `DomainResource` (abstract), and the
constraint profiles on resources (e.g. `vitalsigns`, derivation = "constraint").
"""

import argparse
import hashlib
import json
import os
import sys

FHIR_VERSION = "4.0.1"
PACKAGE_NAME = "hl7.fhir.r4.core"
RESOURCE_TYPES_CS = "http://hl7.org/fhir/resource-types"
SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "src", "fhir", "resource_types.rs")
SCRIPT = "tools/gen_resource_types.py"

SD_FIELDS = (
    "id",
    "url",
    "name",
    "type",
    "kind",
    "abstract",
    "derivation",
    "baseDefinition",
    "fhirVersion",
)


def fail(msg):
    sys.exit("gen_resource_types: " + msg)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------- extract


def extract(package_dir):
    """Reduce an unpacked hl7.fhir.r4.core package to the checked-in extract."""
    pkg_path = os.path.join(package_dir, "package.json")
    with open(pkg_path, encoding="utf-8") as f:
        pkg = json.load(f)
    versions = pkg.get("fhir-version-list") or pkg.get("fhirVersions") or []
    if pkg.get("name") != PACKAGE_NAME or pkg.get("version") != FHIR_VERSION:
        fail("%s is %s#%s, want %s#%s" % (pkg_path, pkg.get("name"), pkg.get("version"),
                                          PACKAGE_NAME, FHIR_VERSION))
    if versions != [FHIR_VERSION]:
        fail("%s lists FHIR versions %r, want [%r]" % (pkg_path, versions, FHIR_VERSION))

    sds = []
    for fn in sorted(os.listdir(package_dir)):
        if not (fn.startswith("StructureDefinition-") and fn.endswith(".json")):
            continue
        path = os.path.join(package_dir, fn)
        with open(path, encoding="utf-8") as f:
            sd = json.load(f)
        if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
            continue
        entry = {k: sd[k] for k in SD_FIELDS if k in sd}
        entry["file"] = fn
        entry["sha256"] = sha256_of(path)
        sds.append(entry)

    cs_fn = "CodeSystem-resource-types.json"
    cs_path = os.path.join(package_dir, cs_fn)
    with open(cs_path, encoding="utf-8") as f:
        cs = json.load(f)
    if cs.get("url") != RESOURCE_TYPES_CS or cs.get("version") != FHIR_VERSION:
        fail("%s is not %s|%s" % (cs_path, RESOURCE_TYPES_CS, FHIR_VERSION))

    out = {
        "_comment": "Extract of the official FHIR R4 core package; produced by "
        "`python3 %s --extract PACKAGE_DIR`. See SOURCE.md." % SCRIPT,
        "package": {k: pkg[k] for k in ("name", "version", "fhir-version-list", "canonical",
                                        "url") if k in pkg},
        "structureDefinitions": sds,
        "resourceTypesCodeSystem": {
            "file": cs_fn,
            "sha256": sha256_of(cs_path),
            "url": cs["url"],
            "version": cs["version"],
            "codes": [c["code"] for c in cs["concept"]],
        },
    }
    return out


# -------------------------------------------------------------------------- generate


def select(data):
    """Return the sorted list of concrete R4 resource type names, after cross-checks."""
    pkg = data["package"]
    if pkg.get("name") != PACKAGE_NAME or pkg.get("version") != FHIR_VERSION:
        fail("extract comes from %s#%s, want %s#%s" % (pkg.get("name"), pkg.get("version"),
                                                       PACKAGE_NAME, FHIR_VERSION))
    types = []
    abstract = set()
    for sd in data["structureDefinitions"]:
        if sd.get("fhirVersion") != FHIR_VERSION:
            fail("%s has fhirVersion %r" % (sd.get("url"), sd.get("fhirVersion")))
        if sd.get("kind") != "resource":
            continue
        if sd.get("abstract"):
            abstract.add(sd["type"])
            continue
        if sd.get("derivation") != "specialization":
            continue  # a profile (constraint) on some resource, not a type of its own
        name = sd["type"]
        if sd.get("url") != SD_PREFIX + name or sd.get("name") != name:
            fail("unexpected url/name for resource type %r: %r" % (name, sd.get("url")))
        types.append(name)

    if len(set(types)) != len(types):
        fail("duplicate resource types in extract")
    if abstract != {"Resource", "DomainResource"}:
        fail("unexpected abstract resource set %r" % sorted(abstract))

    # Independent cross-check: the resource-types CodeSystem lists every resource,
    # abstract ones included.
    codes = set(data["resourceTypesCodeSystem"]["codes"])
    if codes - abstract != set(types):
        fail("StructureDefinitions and CodeSystem resource-types disagree: %r / %r"
             % (sorted(codes - abstract - set(types)), sorted(set(types) - codes)))

    # Rust compares &str byte-wise; sort the same way so binary_search works.
    return sorted(types, key=lambda s: s.encode("utf-8"))


def render(types, data):
    pkg = data["package"]
    lines = [
        "// @generated by %s -- DO NOT EDIT." % SCRIPT,
        "//",
        "// Source: FHIR R4 (%s) core package %s#%s (%s),"
        % (FHIR_VERSION, pkg["name"], pkg["version"], pkg.get("url", pkg.get("canonical", ""))),
        "// (where to get it: tools/fhir-r4/SOURCE.md).",
        "// Selection: StructureDefinitions with kind = resource, derivation = specialization,",
        "// abstract = false (so not `Resource` or `DomainResource`); cross-checked against",
        "// the CodeSystem %s." % RESOURCE_TYPES_CS,
        "// Regenerate: python3 %s PACKAGE_DIR" % SCRIPT,
        "",
        "/// Every concrete resource type of FHIR R4 (%s), sorted byte-wise (the order" % FHIR_VERSION,
        "/// of `str`'s `Ord`), so it can be binary-searched. Case-sensitive, as in the",
        "/// specification.",
        "pub const RESOURCE_TYPES: &[&str] = &[",
    ]
    lines += ['    "%s",' % t for t in types]
    lines += [
        "];",
        "",
        "/// Whether `name` is exactly (case-sensitively) a concrete FHIR R4 resource type.",
        "pub fn is_resource_type(name: &str) -> bool {",
        "    RESOURCE_TYPES.binary_search(&name).is_ok()",
        "}",
        "",
        "#[cfg(test)]",
        "mod tests {",
        "    use super::*;",
        "",
        "    #[test]",
        "    fn count_matches_the_r4_specification() {",
        "        assert_eq!(RESOURCE_TYPES.len(), %d);" % len(types),
        "    }",
        "",
        "    #[test]",
        "    fn sorted_and_unique_for_binary_search() {",
        "        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));",
        "    }",
        "",
        "    #[test]",
        "    fn known_types_are_present() {",
        "        for name in [",
        '            "Patient",',
        '            "Observation",',
        '            "MedicationRequest",',
        '            "Bundle",',
        '            "Parameters",',
        '            "Binary",',
        '            "Account",',
        '            "VisionPrescription",',
        "        ] {",
        '            assert!(is_resource_type(name), "{name} should be a resource type");',
        "        }",
        "    }",
        "",
        "    #[test]",
        "    fn abstract_and_unknown_names_are_absent() {",
        "        for name in [",
        '            "Resource",',
        '            "DomainResource",',
        '            "patient",',
        '            "PATIENT",',
        '            "Foo",',
        '            "",',
        '            "Patient ",',
        '            "MedicationOrder",',
        "        ] {",
        '            assert!(!is_resource_type(name), "{name:?} is not a resource type");',
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if %s is not up to date" % OUTPUT)
    ap.add_argument("package", metavar="PACKAGE_DIR",
                    help="an unpacked %s#%s package directory (package.json, "
                    "StructureDefinition-*.json, CodeSystem-resource-types.json)"
                    % (PACKAGE_NAME, FHIR_VERSION))
    args = ap.parse_args()

    data = extract(args.package)
    types = select(data)
    text = render(types, data)

    if args.check:
        try:
            with open(OUTPUT, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            sys.exit("gen_resource_types: src/fhir/resource_types.rs is stale; "
                     "run python3 %s" % SCRIPT)
        print("src/fhir/resource_types.rs is up to date (%d resource types)" % len(types))
        return

    with open(OUTPUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print("wrote src/fhir/resource_types.rs (%d resource types)" % len(types))


if __name__ == "__main__":
    main()
