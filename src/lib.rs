//! fhirwall: a SMART on FHIR enforcement gateway on Pingora.
//!
//! The request pipeline, one module per stage (see `ARCHITECTURE.md`):
//! [`route`] → [`extract`] → [`token`] (validate) → bind (in [`proxy`]) →
//! [`fhir::classify`] → [`decide`] (with [`scope`]) → [`proxy`] →
//! record ([`audit`], [`metrics`]). Denials are mapped to HTTP in [`deny`].

pub mod admin;
pub mod audit;
pub mod authorise;
pub mod check;
pub mod client_addr;
pub mod config;
pub mod decide;
pub mod demo;
pub mod deny;
pub mod dpop;
pub mod explain;
pub mod extract;
pub mod fhir;
pub mod lifecycle;
pub mod listening;
pub mod metrics;
pub mod pages;
pub mod policy;
pub mod proxy;
pub mod proxy_headers;
pub mod ratelimit;
pub mod resolve;
pub mod route;
pub mod sandbox;
pub mod scope;
pub mod server;
pub mod shared;
pub mod token;
pub mod trust;
pub mod upstream;

/// An error and what caused it, as one line (reqwest's own says "error
/// following redirect" and keeps why in its source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A failed call's error for the log: its causes, without the URL, whose
/// query may hold a key (`?subscription-key=`).
pub fn call_error(e: reqwest::Error) -> String {
    error_chain(&e.without_url())
}
