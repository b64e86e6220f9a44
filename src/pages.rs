//! Later pages of `Patient/{id}/$everything`.
//!
//! A server pages `$everything` as a stored search: page 2 on is
//! `GET [base]?_getpages={id}&_getpagesoffset=…` (HAPI; `_pageId` on
//! others), which names neither the patient nor the operation. Judged as
//! any stored page under `patient/` scopes, every resource in it must be in
//! the patient's compartment, so the Practitioner or Medication that the
//! operation rightly returns makes the page a 502.
//!
//! So the gateway remembers which caller's `$everything` answer (checked
//! and passed on) carried which page ids, and judges a later page as that
//! operation's answer again — for the same caller (issuer, client, user)
//! in the same patient context, and only if the operation itself is
//! allowed to that token now (`authorise::everything_page`). Anyone else
//! asking for the page, or a page id the gateway has not seen or has
//! forgotten (another instance's, or after [`REMEMBERED`] unused), is
//! judged as any stored page: fail closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fhir::classify::{FhirRequest, Interaction};
use crate::fhir::json_edit;
use crate::token::Claims;

/// How long a page id is remembered after its last use: HAPI keeps a
/// stored search an hour by default.
pub const REMEMBERED: Duration = Duration::from_secs(3600);

/// At most this many page ids are remembered; past it the least used are
/// forgotten (their pages then fail closed).
pub const MAX_REMEMBERED: u64 = 100_000;

/// At most this many page ids are remembered for one caller (issuer,
/// client, user), so that one cannot crowd out every other's: past it, its
/// new ones are not remembered (its later pages fail closed).
pub const MAX_PER_CALLER: usize = 1000;

/// A page id longer than this is not remembered (real ones are UUIDs).
const MAX_PAGE_ID: usize = 256;

/// Who ran the `$everything` a page id came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    issuer: String,
    client_id: Option<String>,
    sub: Option<String>,
    patient: String,
}

impl Origin {
    /// Who the caller is, whatever the patient: what [`MAX_PER_CALLER`]
    /// counts.
    fn caller(&self) -> (String, Option<String>, Option<String>) {
        (
            self.issuer.clone(),
            self.client_id.clone(),
            self.sub.clone(),
        )
    }

    /// The caller of `claims` in the context of `patient`.
    pub fn of(claims: &Claims, patient: &str) -> Origin {
        Origin {
            issuer: claims.issuer_name.clone(),
            client_id: claims.client_id.clone(),
            sub: claims.sub.clone(),
            patient: patient.to_string(),
        }
    }
}

/// Callers one page id is remembered for (a server may hand the same
/// stored result to two callers of one patient).
const ORIGINS_PER_PAGE: usize = 4;

/// Page ids remembered per caller.
type Counts = moka::sync::Cache<(String, Option<String>, Option<String>), Arc<AtomicUsize>>;

/// The page ids of `$everything` answers passed on, and whose they are.
pub struct EverythingPages {
    origins: moka::sync::Cache<String, Arc<std::sync::Mutex<Vec<Origin>>>>,
    /// How many of them each caller holds (a forgotten id is uncounted).
    per_caller: Counts,
}

/// One caller's count goes down by one (a page id forgotten for it).
fn uncount(counts: &Counts, origin: &Origin) {
    if let Some(n) = counts.get(&origin.caller()) {
        let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
}

impl Default for EverythingPages {
    fn default() -> Self {
        let per_caller: Counts = moka::sync::Cache::builder()
            .time_to_idle(REMEMBERED)
            .max_capacity(MAX_REMEMBERED)
            .build();
        let counts = per_caller.clone();
        EverythingPages {
            origins: moka::sync::Cache::builder()
                .time_to_idle(REMEMBERED)
                .max_capacity(MAX_REMEMBERED)
                .eviction_listener(move |_id, origins: Arc<std::sync::Mutex<Vec<Origin>>>, _| {
                    let origins = origins.lock().unwrap_or_else(|e| e.into_inner());
                    for o in origins.iter() {
                        uncount(&counts, o);
                    }
                })
                .build(),
            per_caller,
        }
    }
}

impl EverythingPages {
    /// Remembers the page ids in the paging links of `body`, a
    /// `$everything` answer passed on to `origin`'s caller, under one of
    /// `bases` (the upstream's, and the public one a server told its
    /// public address links under).
    pub fn remember<B: AsRef<str>>(&self, body: &[u8], bases: &[B], origin: &Origin) {
        let count = self.per_caller.get_with(origin.caller(), Default::default);
        for id in page_ids(body, bases) {
            if count.load(Ordering::Relaxed) >= MAX_PER_CALLER {
                tracing::debug!(
                    max = MAX_PER_CALLER,
                    "$everything page id not remembered: this caller holds the most"
                );
                return;
            }
            let callers = self.origins.get_with(id, Default::default);
            let mut callers = callers.lock().unwrap_or_else(|e| e.into_inner());
            if !callers.contains(origin) {
                if callers.len() == ORIGINS_PER_PAGE {
                    uncount(&self.per_caller, &callers.remove(0));
                }
                callers.push(origin.clone());
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether `req` is a stored page whose id a `$everything` of
    /// `origin`'s caller, in the same patient context, gave.
    pub fn made_for(&self, req: &FhirRequest, origin: &Origin) -> bool {
        let made = page_id(req)
            .and_then(|id| self.origins.get(id))
            .is_some_and(|o| o.lock().unwrap_or_else(|e| e.into_inner()).contains(origin));
        // The caller's count idles out with its ids, not before: a page
        // fetched keeps both (a count that idled out while the caller paged
        // through its ids started again at 0, and the caller could
        // remember another MAX_PER_CALLER, and so on). Never removed
        // otherwise, so a count being added to is never one taken out.
        if made {
            let _ = self.per_caller.get(&origin.caller());
        }
        made
    }
}

/// The page id a stored page asks for (`_getpages` or `_pageId`).
pub fn page_id(req: &FhirRequest) -> Option<&str> {
    if req.interaction != Interaction::SearchSystem || !crate::decide::is_stored_page(req) {
        return None;
    }
    let mut ids = req
        .params
        .iter()
        .filter(|(n, _)| n == "_getpages" || n == "_pageId");
    // Two ids: which one the server serves is its choice.
    match (ids.next(), ids.next()) {
        (Some((_, v)), None) => Some(v.as_str()),
        _ => None,
    }
}

/// The page ids (`_getpages`, `_pageId`) the paging links of a Bundle
/// carry (`next`, `previous`, `prev`, `first`, `last`; never `self`, which
/// may echo what the client asked for) under one of `bases`.
pub fn page_ids<B: AsRef<str>>(body: &[u8], bases: &[B]) -> Vec<String> {
    let Some(top) = std::str::from_utf8(body).ok().and_then(json_edit::parse) else {
        return Vec::new();
    };
    let links = top.get("link").and_then(|l| json_edit::elements(l));
    let mut ids: Vec<String> = Vec::new();
    let text = |raw: Option<&serde_json::value::RawValue>| {
        raw.and_then(|u| serde_json::from_str::<String>(u.get()).ok())
    };
    for link in links.iter().flatten() {
        let paging = text(json_edit::member(link, "relation"))
            .is_some_and(|r| matches!(r.as_str(), "next" | "previous" | "prev" | "first" | "last"));
        let Some(url) = text(json_edit::member(link, "url")) else {
            continue;
        };
        let under_base = bases.iter().any(|base| {
            url.strip_prefix(base.as_ref())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        });
        if !paging || !under_base {
            continue;
        }
        let Some((_, query)) = url.split_once('?') else {
            continue;
        };
        let query = query.split('#').next().unwrap_or("");
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if (name == "_getpages" || name == "_pageId")
                && !value.is_empty()
                && value.len() <= MAX_PAGE_ID
                && !ids.iter().any(|i| *i == value)
            {
                ids.push(value.into_owned());
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::classify::{classify, HttpRequest};

    fn get(query: &str) -> FhirRequest {
        classify(HttpRequest {
            method: "GET",
            path: "",
            query: Some(query),
            if_none_exist: None,
        })
        .unwrap()
    }

    fn origin(sub: &str, patient: &str) -> Origin {
        Origin {
            issuer: "main".into(),
            client_id: Some("app".into()),
            sub: Some(sub.into()),
            patient: patient.into(),
        }
    }

    #[test]
    fn page_ids_are_read_from_every_link() {
        let body = br#"{"resourceType":"Bundle","link":[
            {"relation":"self","url":"http://up/fhir/Patient/p1/$everything?_getpages=echoed"},
            {"relation":"next","url":"http://up/fhir?_getpages=abc-1&_getpagesoffset=2&_count=2"},
            {"relation":"last","url":"http://up/fhir?_getpages=abc-1&_getpagesoffset=8"},
            {"relation":"previous","url":"http://up/fhir?_pageId=x%20y#frag"},
            {"relation":"first","url":"http://other/fhir?_getpages=elsewhere"},
            {"relation":"prev","url":"http://up/fhirx?_getpages=sibling-base"},
            {"relation":"odd","url":7}
        ]}"#;
        assert_eq!(page_ids(body, &["http://up/fhir"]), ["abc-1", "x y"]);
        // A server told its public address links under that one.
        assert_eq!(
            page_ids(body, &["https://gw/fhir", "http://other/fhir"]),
            ["elsewhere"]
        );
        assert!(page_ids(b"not json", &["http://up/fhir"]).is_empty());
        assert!(page_ids(
            br#"{"link":{"relation":"next","url":"http://up/fhir?_getpages=a"}}"#,
            &["http://up/fhir"]
        )
        .is_empty());
        let long = format!(
            r#"{{"link":[{{"relation":"next","url":"http://up/fhir?_getpages={}"}}]}}"#,
            "a".repeat(257)
        );
        assert!(page_ids(long.as_bytes(), &["http://up/fhir"]).is_empty());
    }

    #[test]
    fn a_page_is_made_for_its_origin_only() {
        let pages = EverythingPages::default();
        let body = br#"{"link":[{"relation":"next","url":"http://up/fhir?_getpages=abc&_getpagesoffset=2"}]}"#;
        pages.remember(body, &["http://up/fhir"], &origin("u1", "p1"));
        let page = get("_getpages=abc&_getpagesoffset=4&_count=2&_bundletype=searchset");
        assert!(pages.made_for(&page, &origin("u1", "p1")));
        // The same stored result given to a second caller: both keep it.
        pages.remember(body, &["http://up/fhir"], &origin("u3", "p1"));
        assert!(pages.made_for(&page, &origin("u1", "p1")));
        assert!(pages.made_for(&page, &origin("u3", "p1")));
        for (what, other) in [
            ("another user", origin("u2", "p1")),
            ("another patient", origin("u1", "p2")),
            (
                "another issuer",
                Origin {
                    issuer: "other".into(),
                    ..origin("u1", "p1")
                },
            ),
            (
                "no client",
                Origin {
                    client_id: None,
                    ..origin("u1", "p1")
                },
            ),
        ] {
            assert!(!pages.made_for(&page, &other), "{what}");
        }
        for (what, q) in [
            ("an unknown page id", "_getpages=abd"),
            ("a search beside the page id", "_getpages=abc&code=x"),
            ("two page ids", "_getpages=abc&_getpages=abc"),
            ("relabelled as history", "_getpages=abc&_bundletype=history"),
        ] {
            assert!(!pages.made_for(&get(q), &origin("u1", "p1")), "{what}");
        }
    }

    /// One caller holds at most MAX_PER_CALLER page ids: past it its new
    /// ones are not remembered, and other callers' still are.
    #[test]
    fn one_caller_cannot_crowd_out_the_others() {
        let pages = EverythingPages::default();
        let body = |id: usize| {
            format!(
                r#"{{"link":[{{"relation":"next","url":"http://up/fhir?_getpages=id-{id}"}}]}}"#
            )
        };
        for i in 0..MAX_PER_CALLER + 5 {
            pages.remember(body(i).as_bytes(), &["http://up/fhir"], &origin("u1", "p1"));
        }
        let page = |i: usize| get(&format!("_getpages=id-{i}"));
        assert!(pages.made_for(&page(0), &origin("u1", "p1")));
        assert!(pages.made_for(&page(MAX_PER_CALLER - 1), &origin("u1", "p1")));
        assert!(!pages.made_for(&page(MAX_PER_CALLER), &origin("u1", "p1")));
        // The same caller for another patient counts against the same cap.
        pages.remember(
            body(90_000).as_bytes(),
            &["http://up/fhir"],
            &origin("u1", "p2"),
        );
        assert!(!pages.made_for(&page(90_000), &origin("u1", "p2")));
        pages.remember(
            body(90_001).as_bytes(),
            &["http://up/fhir"],
            &origin("u2", "p1"),
        );
        assert!(pages.made_for(&page(90_001), &origin("u2", "p1")));
    }
}
