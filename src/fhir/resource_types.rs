// TEMPORARY placeholder until tools/gen_resource_types.py output lands.
pub const RESOURCE_TYPES: &[&str] = &["Bundle", "Condition", "Encounter", "Group", "Observation", "Patient", "Practitioner", "RelatedPerson", "Device", "MedicationRequest"];
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.contains(&name)
}
