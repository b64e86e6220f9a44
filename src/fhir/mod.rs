//! FHIR R4 knowledge: the resource-type list and the Patient compartment
//! table (both generated from the specification) and the request
//! classifier (stage 5).

pub mod classify;
pub mod compartment;
#[rustfmt::skip]
mod patient_compartment;
pub mod resource_types;
