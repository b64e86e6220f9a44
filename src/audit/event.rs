//! FHIR `AuditEvent` form of a record (IHE BALP).

use serde_json::{json, Value};

use super::Record;

pub fn audit_event(r: &Record) -> Value {
    json!({"resourceType": "AuditEvent", "id": r.id})
}
