//! SMART App Launch 2.x clinical scopes: parsing and matching.
//!
//! Pure: takes scope strings, returns values. A scope is
//! `(patient|user|system)/(Type|*).(read|write|*|[c][r][u][d][s])[?filter]`.
//! v1 suffixes map to v2 letters as the specification says: `read` = `rs`,
//! `write` = `cud`, `*` = `cruds`. v2 letters must be a non-empty, in-order
//! subset of `cruds`; anything else is not a clinical scope and grants
//! nothing (it is kept in [`ScopeSet::unrecognised`] for the audit trail).
//! Non-resource scopes (`openid`, `launch/patient`, `offline_access`, …)
//! grant nothing and are not errors.

use std::fmt;

use crate::fhir::resource_types::is_resource_type;

/// The context a clinical scope applies in, ordered from the narrowest to
/// the widest (only `system/` may run `$export`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Context {
    Patient,
    User,
    System,
}

impl Context {
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// One SMART permission letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Perm {
    /// The letters in the order v2 scopes must write them (`cruds`).
    pub const IN_ORDER: [Perm; 5] = [
        Perm::Create,
        Perm::Read,
        Perm::Update,
        Perm::Delete,
        Perm::Search,
    ];

    fn bit(self) -> u8 {
        match self {
            Perm::Create => 1,
            Perm::Read => 2,
            Perm::Update => 4,
            Perm::Delete => 8,
            Perm::Search => 16,
        }
    }

    /// The v2 letter.
    pub fn letter(self) -> char {
        match self {
            Perm::Create => 'c',
            Perm::Read => 'r',
            Perm::Update => 'u',
            Perm::Delete => 'd',
            Perm::Search => 's',
        }
    }
}

/// A set of permission letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const ALL: Perms = Perms(31);

    pub fn contains(self, p: Perm) -> bool {
        self.0 & p.bit() != 0
    }

    /// The v2 letters, in order (`cruds` for all).
    pub fn letters(self) -> String {
        Perm::IN_ORDER
            .iter()
            .filter(|p| self.contains(**p))
            .map(|p| p.letter())
            .collect()
    }

    /// Parses a scope suffix: v1 `read`/`write`/`*` or in-order v2 letters.
    pub fn parse(suffix: &str) -> Option<Perms> {
        match suffix {
            "read" => return Some(Perms(Perm::Read.bit() | Perm::Search.bit())),
            "write" => {
                return Some(Perms(
                    Perm::Create.bit() | Perm::Update.bit() | Perm::Delete.bit(),
                ))
            }
            "*" => return Some(Perms::ALL),
            "" => return None,
            _ => {}
        }
        let order = Perm::IN_ORDER;
        let mut next = 0;
        let mut bits = 0u8;
        for ch in suffix.chars() {
            let pos = order[next..].iter().position(|p| p.letter() == ch)?;
            bits |= order[next + pos].bit();
            next += pos + 1;
        }
        Some(Perms(bits))
    }
}

/// Which resource types a scope covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resources {
    All,
    Type(String),
}

/// One parsed clinical scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The scope exactly as the token carried it.
    pub raw: String,
    pub context: Context,
    pub resources: Resources,
    pub perms: Perms,
    /// The v2 query filter after `?`, if any.
    pub filter: Option<String>,
}

impl Scope {
    /// Parses one scope; `None` when it is not a clinical (resource) scope.
    pub fn parse(raw: &str) -> Option<Scope> {
        let (context, rest) = raw.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        let (body, filter) = match rest.split_once('?') {
            Some((b, f)) => (b, Some(f.to_string())),
            None => (rest, None),
        };
        let (resource, suffix) = body.split_once('.')?;
        let resources = match resource {
            "*" => Resources::All,
            t if is_resource_type(t) => Resources::Type(t.to_string()),
            _ => return None,
        };
        let perms = Perms::parse(suffix)?;
        if filter.as_deref() == Some("") {
            return None;
        }
        Some(Scope {
            raw: raw.to_string(),
            context,
            resources,
            perms,
            filter,
        })
    }

    /// Does this scope, ignoring its context and filter, cover `perm` on
    /// `resource` (`None` meaning every resource type)?
    pub fn covers(&self, perm: Perm, resource: Option<&str>) -> bool {
        if !self.perms.contains(perm) {
            return false;
        }
        match (&self.resources, resource) {
            (Resources::All, _) => true,
            (Resources::Type(t), Some(r)) => t == r,
            (Resources::Type(_), None) => false,
        }
    }
}

impl Scope {
    /// What this scope grants that `ceiling` also grants, as one scope, or
    /// `None` when they share nothing (or share something one scope cannot
    /// say: two different filters). The context is the narrower one, in
    /// the order `patient/`, `user/`, `system/` (a `user/` ceiling does not
    /// let a `system/` scope reach what only `system/` may, such as
    /// `$export`).
    pub fn intersect(&self, ceiling: &Scope) -> Option<Scope> {
        let resources = match (&self.resources, &ceiling.resources) {
            (Resources::All, r) | (r, Resources::All) => r.clone(),
            (Resources::Type(a), Resources::Type(b)) if a == b => self.resources.clone(),
            _ => return None,
        };
        let perms = Perms(self.perms.0 & ceiling.perms.0);
        if perms.0 == 0 {
            return None;
        }
        let filter = match (&self.filter, &ceiling.filter) {
            (None, f) | (f, None) => f.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        // Never wider than either side: patient/ < user/ < system/ (only
        // system/ may run `$export`).
        let context = self.context.min(ceiling.context);
        let unchanged = context == self.context
            && resources == self.resources
            && perms == self.perms
            && filter == self.filter;
        let raw = if unchanged {
            self.raw.clone()
        } else {
            let resource = match &resources {
                Resources::All => "*",
                Resources::Type(t) => t.as_str(),
            };
            let mut raw = format!("{}/{resource}.{}", context.as_str(), perms.letters());
            if let Some(f) = &filter {
                raw.push('?');
                raw.push_str(f);
            }
            raw
        };
        Some(Scope {
            raw,
            context,
            resources,
            perms,
            filter,
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// The clinical scopes of a token, plus what was not recognised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<Scope>,
    /// Scopes that look clinical (`context/…`) but are malformed, e.g.
    /// `patient/Observation.sr`, `user/Foo.read`. They grant nothing.
    pub unrecognised: Vec<String>,
    /// Every other scope (`openid`, `launch/patient`, `offline_access`,
    /// …): they grant no resource access but policies may match them.
    pub other: Vec<String>,
}

impl ScopeSet {
    /// Parses a space-separated OAuth `scope` string.
    pub fn parse(scope: &str) -> ScopeSet {
        let mut set = ScopeSet::default();
        for raw in scope.split(' ').filter(|s| !s.is_empty()) {
            match Scope::parse(raw) {
                Some(s) => set.scopes.push(s),
                None => {
                    let looks_clinical = ["patient/", "user/", "system/"]
                        .iter()
                        .any(|p| raw.starts_with(p));
                    if looks_clinical {
                        set.unrecognised.push(raw.to_string());
                    } else {
                        set.other.push(raw.to_string());
                    }
                }
            }
        }
        set
    }

    /// Every scope as the token carries it: resource scopes, malformed
    /// ones and the others.
    pub fn all_raw(&self) -> Vec<String> {
        self.scopes
            .iter()
            .map(|s| s.raw.clone())
            .chain(self.unrecognised.iter().cloned())
            .chain(self.other.iter().cloned())
            .collect()
    }

    /// The part of these scopes that `ceiling` also grants: every pairwise
    /// [`Scope::intersect`], once each. Unrecognised scopes stay out (they
    /// grant nothing either way).
    pub fn intersect(&self, ceiling: &ScopeSet) -> ScopeSet {
        let mut set = ScopeSet::default();
        for s in &self.scopes {
            for c in &ceiling.scopes {
                if let Some(i) = s.intersect(c) {
                    if !set.scopes.contains(&i) {
                        set.scopes.push(i);
                    }
                }
            }
        }
        set
    }

    /// True if any scope is in the patient context.
    pub fn has_context(&self, context: Context) -> bool {
        self.scopes.iter().any(|s| s.context == context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(s: &str) -> String {
        Perms::parse(s).unwrap().letters()
    }

    #[test]
    fn intersection_keeps_what_both_grant() {
        let meet = |a: &str, b: &str| {
            Scope::parse(a)
                .unwrap()
                .intersect(&Scope::parse(b).unwrap())
                .map(|s| s.raw)
        };
        let table: &[(&str, &str, Option<&str>)] = &[
            // The ceiling is wider: the token's scope, as the token said it.
            (
                "user/Observation.rs",
                "user/*.cruds",
                Some("user/Observation.rs"),
            ),
            (
                "user/Observation.read",
                "user/*.*",
                Some("user/Observation.read"),
            ),
            // The ceiling is narrower in context, type or letters.
            ("user/*.rs", "patient/*.read", Some("patient/*.rs")),
            (
                "user/*.cruds",
                "user/Observation.rs",
                Some("user/Observation.rs"),
            ),
            (
                "system/*.cruds",
                "patient/Condition.r",
                Some("patient/Condition.r"),
            ),
            // Never wider than the ceiling: system/ under a user/ ceiling is
            // user/ (no $export); user/ under a system/ ceiling stays user/.
            ("system/*.read", "user/*.read", Some("user/*.rs")),
            ("user/*.rs", "system/*.rs", Some("user/*.rs")),
            ("user/Observation.cud", "user/Observation.rs", None),
            ("user/Observation.rs", "user/Condition.rs", None),
            // A patient/ token scope stays patient/ under a user/ ceiling.
            ("patient/*.rs", "user/*.read", Some("patient/*.rs")),
            // Filters: one side's filter holds; two different ones cannot
            // be said in one scope, so nothing is granted.
            (
                "user/Observation.rs",
                "user/Observation.rs?category=laboratory",
                Some("user/Observation.rs?category=laboratory"),
            ),
            (
                "patient/Observation.rs?category=vital-signs",
                "user/*.rs",
                Some("patient/Observation.rs?category=vital-signs"),
            ),
            (
                "user/Observation.rs?category=vital-signs",
                "user/Observation.rs?category=laboratory",
                None,
            ),
        ];
        for (token, ceiling, want) in table {
            assert_eq!(
                meet(token, ceiling).as_deref(),
                *want,
                "{token} under {ceiling}"
            );
        }
        let i = Scope::parse("user/*.rs")
            .unwrap()
            .intersect(&Scope::parse("patient/Observation.read").unwrap())
            .unwrap();
        assert_eq!(i.context, Context::Patient);
        assert_eq!(i.resources, Resources::Type("Observation".into()));
        assert!(
            i.covers(Perm::Read, Some("Observation"))
                && !i.covers(Perm::Create, Some("Observation"))
        );
    }

    #[test]
    fn set_intersection_pairs_every_scope() {
        let token = ScopeSet::parse("user/*.rs user/Observation.cu openid launch/patient");
        let ceiling = ScopeSet::parse("patient/*.read user/Observation.cruds");
        let raws: Vec<String> = token
            .intersect(&ceiling)
            .scopes
            .into_iter()
            .map(|s| s.raw)
            .collect();
        assert_eq!(
            raws,
            ["patient/*.rs", "user/Observation.rs", "user/Observation.cu"]
        );
        assert!(token.intersect(&ScopeSet::default()).scopes.is_empty());
    }

    #[test]
    fn v1_maps_to_v2_as_specified() {
        assert_eq!(perms("read"), "rs");
        assert_eq!(perms("write"), "cud");
        assert_eq!(perms("*"), "cruds");
    }

    #[test]
    fn v2_letters_must_be_in_order() {
        for ok in ["c", "r", "s", "rs", "cu", "cud", "cruds", "crs", "ds"] {
            assert_eq!(perms(ok), ok, "{ok}");
        }
        // ".dus" is the specification's own example of an undefined request.
        for bad in [
            "dus",
            "sr",
            "rr",
            "x",
            "",
            "readwrite",
            "R",
            "cruds*",
            "c r",
        ] {
            assert!(Perms::parse(bad).is_none(), "{bad} must not parse");
        }
    }

    #[test]
    fn parses_the_specification_examples() {
        let s = Scope::parse("patient/Observation.rs").unwrap();
        assert_eq!(s.context, Context::Patient);
        assert_eq!(s.resources, Resources::Type("Observation".into()));
        assert!(s.covers(Perm::Read, Some("Observation")));
        assert!(s.covers(Perm::Search, Some("Observation")));
        assert!(!s.covers(Perm::Create, Some("Observation")));
        assert!(!s.covers(Perm::Read, Some("Condition")));

        let s = Scope::parse("user/*.cruds").unwrap();
        assert!(s.covers(Perm::Delete, Some("Patient")));
        assert!(s.covers(Perm::Search, None));

        let s = Scope::parse("patient/Observation.cu").unwrap();
        assert!(
            s.covers(Perm::Create, Some("Observation"))
                && s.covers(Perm::Update, Some("Observation"))
        );
        assert!(!s.covers(Perm::Read, Some("Observation")));

        let s = Scope::parse(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        )
        .unwrap();
        assert_eq!(
            s.filter.as_deref(),
            Some("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
        );

        let s = Scope::parse("system/*.read").unwrap();
        assert_eq!(s.context, Context::System);
        assert!(
            s.covers(Perm::Read, Some("Encounter")) && !s.covers(Perm::Update, Some("Encounter"))
        );
        let t = Scope::parse("user/Patient.r").unwrap();
        assert!(
            !t.covers(Perm::Read, None),
            "a typed scope does not cover every type"
        );
    }

    #[test]
    fn non_resource_and_malformed_scopes_grant_nothing() {
        let set = ScopeSet::parse(
            "openid fhirUser launch launch/patient offline_access online_access profile \
             patient/Observation.sr user/Foo.read system/patient.read patient/Observation. \
             patient/Observation.rs?  patient/*.read",
        );
        assert_eq!(set.scopes.len(), 1);
        assert_eq!(set.scopes[0].raw, "patient/*.read");
        assert_eq!(
            set.unrecognised,
            vec![
                "patient/Observation.sr",
                "user/Foo.read",
                "system/patient.read",
                "patient/Observation.",
                "patient/Observation.rs?"
            ]
        );
        // The others are kept for policies, which may match any scope.
        assert_eq!(
            set.other,
            vec![
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "offline_access",
                "online_access",
                "profile"
            ]
        );
        assert_eq!(set.all_raw().len(), 13);
        assert!(set.has_context(Context::Patient));
        assert!(!set.has_context(Context::User));
    }
}
