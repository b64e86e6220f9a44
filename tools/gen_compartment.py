#!/usr/bin/env python3
"""Generate src/fhir/patient_compartment.rs and src/fhir/search_params.rs from the FHIR R4 (4.0.1) specification.

Python 3 standard library only.

Usage (from the repository root), with PACKAGE_DIR an unpacked copy of the
official hl7.fhir.r4.core 4.0.1 package (see tools/fhir-r4/SOURCE.md):

    python3 tools/gen_compartment.py PACKAGE_DIR          # (re)write the .rs files
    python3 tools/gen_compartment.py --check PACKAGE_DIR  # exit 1 if one is stale

The second output, search_params.rs, lists the token search parameters whose
values can be evaluated on a resource (for SMART v2 scope filters such as
`patient/Observation.rs?category=...|laboratory`).

Inputs:

- CompartmentDefinition-patient.json: for every resource type, the search
  parameters whose value puts a resource in a Patient's compartment
  (e.g. Observation: subject, performer). A type listed without parameters is
  not in the compartment.
- every StructureDefinition-{type}.json of those types: which resource types
  each path's Reference may point to (a parameter whose paths can only hold
  Patient references is "patient_only": a bare id in it names a Patient).
- every SearchParameter-*.json that is not experimental (the package's
  examples and extension parameters are): the FHIRPath `expression` of each of those
  parameters, reduced to plain element paths (e.g. `Observation.subject` ->
  `subject`; `CarePlan.subject.where(resolve() is Patient)` -> `subject`,
  restricted to Patient references). Every compartment parameter of R4 has
  that simple shape; the generator fails on any other, so nothing is guessed.

Besides the compartment parameters themselves, the table lists, per type, the
other reference search parameters whose every path is a compartment path
(e.g. Observation `patient` = `subject` restricted to Patient). A search that
names the context patient in one of them is narrowed to the compartment just
as if it used the compartment parameter.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys

FHIR_VERSION = "4.0.1"
PACKAGE_NAME = "hl7.fhir.r4.core"
COMPARTMENT_URL = "http://hl7.org/fhir/CompartmentDefinition/patient"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "src", "fhir", "patient_compartment.rs")
PARAMS_OUTPUT = os.path.join(ROOT, "src", "fhir", "search_params.rs")
SCRIPT = "tools/gen_compartment.py"

# One alternative of a search parameter expression, for one base type:
# `Type.a.b` or `Type.a.b.where(resolve() is Patient)`, optionally in parentheses.
PART = re.compile(
    r"^\(?(?P<type>[A-Z][A-Za-z]+)(?P<path>(\.[a-z][A-Za-z]*)+)"
    r"(?P<patient>\.where\(resolve\(\) is Patient\))?\)?$"
)


# `(Type.a.b as X)`: a choice element, `a.bX` in JSON.
AS_PART = re.compile(
    r"^\(?(?P<type>[A-Z][A-Za-z]+)(?P<path>(\.[a-z][A-Za-z]*)+) as (?P<as>[A-Za-z]+)\)?$"
)

# Datatypes whose token matching fhirwall implements.
TOKEN_TYPES = {"CodeableConcept", "Coding", "code", "string", "uri", "id", "boolean", "Identifier"}


def fail(msg):
    sys.exit("gen_compartment: " + msg)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def paths_for(sp, rtype):
    """The element paths `sp` searches on `rtype`, each with its Patient-only flag,
    or None if one of its alternatives for `rtype` is not a plain path."""
    out = []
    for part in (p.strip() for p in sp.get("expression", "").split("|")):
        m = PART.match(part)
        if part.startswith(rtype + ".") or part.startswith("(" + rtype + "."):
            if not m or m.group("type") != rtype:
                return None
            out.append((m.group("path")[1:], bool(m.group("patient"))))
    return out


def element_targets(pkg, cache, rtype, path):
    """The resource types a Reference element `rtype.path` may point to, from
    the type's StructureDefinition snapshot."""
    if rtype not in cache:
        sd = load(os.path.join(pkg, f"StructureDefinition-{rtype}.json"))
        cache[rtype] = {e["path"]: e for e in sd["snapshot"]["element"]}
    el = cache[rtype].get(f"{rtype}.{path}")
    if el is None:
        fail(f"{rtype}.{path}: no such element in StructureDefinition-{rtype}.json")
    targets = set()
    for t in el.get("type", []):
        if t.get("code") != "Reference":
            fail(f"{rtype}.{path}: type {t.get('code')}, need Reference")
        for prof in t.get("targetProfile", []):
            targets.add(prof.rsplit("/", 1)[-1])
    if not targets:
        fail(f"{rtype}.{path}: Reference without target profiles")
    return targets


def extract(pkg):
    meta = load(os.path.join(pkg, "package.json"))
    if meta.get("name") != PACKAGE_NAME or meta.get("version") != FHIR_VERSION:
        fail(f"{pkg} is {meta.get('name')} {meta.get('version')}, need {PACKAGE_NAME} {FHIR_VERSION}")
    cd_path = os.path.join(pkg, "CompartmentDefinition-patient.json")
    cd = load(cd_path)
    if cd.get("url") != COMPARTMENT_URL or cd.get("code") != "Patient":
        fail(f"{cd_path} is not the Patient CompartmentDefinition")

    by_base = {}
    sp_files = sorted(glob.glob(os.path.join(pkg, "SearchParameter-*.json")))
    used = 0
    for f in sp_files:
        sp = load(f)
        # Examples and extension-based parameters (e.g. example-reference,
        # which redefines Condition.subject) are experimental: not the core.
        if sp.get("experimental", False):
            continue
        used += 1
        for base in sp.get("base", []):
            by_base.setdefault((base, sp["code"]), []).append(sp)

    sds = {}

    def patient_only(rtype, paths):
        # Every path either filters on Patient references or can only hold one.
        return all(
            flag or element_targets(pkg, sds, rtype, p) == {"Patient"} for p, flag in paths
        )

    types = []
    for entry in cd["resource"]:
        rtype = entry["code"]
        names = entry.get("param", [])
        compartment = []
        for name in names:
            sps = by_base.get((rtype, name), [])
            if len(sps) != 1:
                fail(f"{rtype}.{name}: {len(sps)} SearchParameter definitions, need exactly 1")
            sp = sps[0]
            if sp.get("type") != "reference":
                fail(f"{rtype}.{name}: type {sp.get('type')}, need reference")
            paths = paths_for(sp, rtype)
            if not paths:
                fail(f"{rtype}.{name}: expression {sp.get('expression')!r} is not a plain path")
            compartment.append((name, paths, patient_only(rtype, paths)))
        compartment_paths = {p for _, ps, _ in compartment for p, _ in ps}
        narrowing = []
        if compartment:
            for (base, name), sps in sorted(by_base.items()):
                if base != rtype or name in names:
                    continue
                if len(sps) != 1:
                    fail(f"{rtype}.{name}: {len(sps)} SearchParameter definitions, need exactly 1")
                sp = sps[0]
                if sp.get("type") != "reference":
                    continue
                paths = paths_for(sp, rtype)
                if paths and all(p in compartment_paths for p, _ in paths):
                    narrowing.append((name, paths, patient_only(rtype, paths)))
        types.append((rtype, compartment, narrowing))
    types.sort(key=lambda t: t[0])
    return meta, cd_path, (used, len(sp_files)), types


def render(meta, cd_path, sp_files, types):
    def param(name, paths, patient_only, in_definition):
        ps = ", ".join(f'"{p}"' for p, _ in paths)
        return (
            f'            LinkParam {{ name: "{name}", paths: &[{ps}], '
            f"patient_only: {str(patient_only).lower()}, in_definition: {str(in_definition).lower()} }},\n"
        )

    members = sum(1 for _, c, _ in types if c)
    out = []
    out.append(f"//! GENERATED by `{SCRIPT}` from `{PACKAGE_NAME}` {meta['version']} — do not edit.\n")
    out.append("//!\n")
    out.append(f"//! Source: `CompartmentDefinition-patient.json` (sha256 {sha256_of(cd_path)})\n")
    out.append(f"//! and the {sp_files[0]} non-experimental of the {sp_files[1]} `SearchParameter-*.json`\n")
    out.append("//! of the package; see\n")
    out.append("//! `tools/fhir-r4/SOURCE.md`. The Patient compartment definition lists\n")
    out.append(f"//! {len(types)} resource types, {members} of them with parameters (in the compartment).\n\n")
    out.append("use super::compartment::{CompartmentType, LinkParam};\n\n")
    out.append("/// Every resource type of the R4 Patient CompartmentDefinition, sorted by name.\n")
    out.append("pub static PATIENT_COMPARTMENT: &[CompartmentType] = &[\n")
    for rtype, compartment, narrowing in types:
        out.append("    CompartmentType {\n")
        out.append(f'        resource_type: "{rtype}",\n')
        if not compartment:
            out.append("        params: &[],\n")
        else:
            out.append("        params: &[\n")
            for name, paths, only in compartment:
                out.append(param(name, paths, only, True))
            for name, paths, only in narrowing:
                out.append(param(name, paths, only, False))
            out.append("        ],\n")
        out.append("    },\n")
    out.append("];\n")
    return "".join(out)


def typed_paths(pkg, sds, sp, rtype):
    """[(json_path, datatype)] of `sp` on `rtype`, or None when one of its
    alternatives is not a plain path (or a plain path cast with `as`) to an
    element of a single datatype."""
    out = []
    for part in (p.strip() for p in sp.get("expression", "").split("|")):
        if not (part.startswith(rtype + ".") or part.startswith("(" + rtype + ".")):
            continue
        m = PART.match(part)
        a = AS_PART.match(part)
        if m and m.group("type") == rtype:
            path = m.group("path")[1:]
            el = element(pkg, sds, rtype, path)
            if el is None:
                return None
            types = {t.get("code") for t in el.get("type", [])}
            if len(types) != 1:
                return None
            out.append((path, types.pop()))
        elif a and a.group("type") == rtype:
            path = a.group("path")[1:]
            el = element(pkg, sds, rtype, path + "[x]")
            cast = a.group("as")
            if el is None or cast not in {t.get("code") for t in el.get("type", [])}:
                return None
            out.append((path + cast[0].upper() + cast[1:], cast))
        else:
            return None
    return out or None


def element(pkg, sds, rtype, path):
    if rtype not in sds:
        sd = load(os.path.join(pkg, f"StructureDefinition-{rtype}.json"))
        sds[rtype] = {e["path"]: e for e in sd["snapshot"]["element"]}
    return sds[rtype].get(f"{rtype}.{path}")


def extract_params(pkg):
    """Every non-experimental token search parameter whose paths fhirwall can
    evaluate on a resource: [(type, name, [(json_path, datatype)])]."""
    rtypes = set()
    for f in glob.glob(os.path.join(pkg, "StructureDefinition-*.json")):
        sd = load(f)
        if sd.get("kind") == "resource" and sd.get("derivation") == "specialization" and not sd.get("abstract"):
            rtypes.add(sd["type"])
    sds = {}
    out = []
    for f in sorted(glob.glob(os.path.join(pkg, "SearchParameter-*.json"))):
        sp = load(f)
        if sp.get("experimental", False) or sp.get("type") != "token":
            continue
        for base in sp.get("base", []):
            if base not in rtypes:
                continue
            paths = typed_paths(pkg, sds, sp, base)
            if paths and all(t in TOKEN_TYPES for _, t in paths):
                out.append((base, sp["code"], paths))
    out.sort()
    for a, b in zip(out, out[1:]):
        if a[:2] == b[:2]:
            fail(f"{a[0]}.{a[1]}: defined twice")
    return out


def render_params(meta, params):
    out = []
    out.append(f"//! GENERATED by `{SCRIPT}` from `{PACKAGE_NAME}` {meta['version']} — do not edit.\n")
    out.append("//!\n")
    out.append("//! Token search parameters of FHIR R4 whose values fhirwall can evaluate on a\n")
    out.append("//! resource: every non-experimental `SearchParameter` of type token whose\n")
    out.append("//! expression is a plain element path (or a choice element cast with `as`) to\n")
    out.append("//! an element of one datatype among CodeableConcept, Coding, code, string,\n")
    out.append("//! uri, id, boolean and Identifier; datatypes from the StructureDefinitions.\n")
    out.append(f"//! {len(params)} (type, parameter) pairs. See `tools/fhir-r4/SOURCE.md`.\n\n")
    out.append("use super::search_param::TokenParam;\n\n")
    out.append("/// Sorted by (resource type, parameter name).\n")
    out.append("pub static TOKEN_PARAMS: &[TokenParam] = &[\n")
    for rtype, name, paths in params:
        ps = ", ".join(f'("{p}", "{t}")' for p, t in paths)
        out.append(f'    TokenParam {{ resource_type: "{rtype}", name: "{name}", paths: &[{ps}] }},\n')
    out.append("];\n")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package_dir")
    ap.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = ap.parse_args()
    extracted = extract(args.package_dir)
    outputs = [
        (OUTPUT, render(*extracted)),
        (PARAMS_OUTPUT, render_params(extracted[0], extract_params(args.package_dir))),
    ]
    for path, text in outputs:
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    fail(f"{path} is stale; rerun without --check")
            print(f"{path} is up to date")
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
