//! FHIR R4 knowledge: the resource-type list (generated from the
//! specification) and the request classifier (stage 5).

pub mod classify;
pub mod resource_types;
