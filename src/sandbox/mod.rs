//! The sandbox: a synthetic FHIR upstream, a local issuer and its keys.
//! Used by `fhirwall demo`, the integration tests and the load bench —
//! never by the gateway's request path.

pub mod fhir;
pub mod issuer;
pub mod keys;
