//! FHIR R4 knowledge: the resource-type list, the Patient compartment table
//! and the token search parameters (all generated from the specification),
//! and the request classifier (stage 5).

pub mod classify;
pub mod compartment;
pub mod entry_sieve;
pub mod json_edit;
#[rustfmt::skip]
mod patient_compartment;
pub mod resource_types;
pub mod search_param;
#[rustfmt::skip]
mod search_params;
pub mod strict_json;
