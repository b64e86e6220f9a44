//! Stage 5, classify: turns an HTTP request below the FHIR base into a typed
//! [`FhirRequest`] — interaction, resource type, id, compartment, operation,
//! search parameters — or refuses it.
//!
//! Pure: no I/O, no clock. Anything that is not a well-formed FHIR R4 RESTful
//! interaction (unknown resource type, malformed id, unexpected path shape,
//! method that does not fit the path) is refused with a [`ClassifyError`]
//! that names what is wrong; nothing is guessed.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde_json::Value;

use super::resource_types::is_resource_type;

/// Resource types that define a compartment in FHIR R4
/// (`[base]/[CompartmentType]/[id]/[type]` searches).
pub const COMPARTMENT_TYPES: &[&str] = &[
    "Device",
    "Encounter",
    "Patient",
    "Practitioner",
    "RelatedPerson",
];

/// Largest number of entries a batch or transaction Bundle may carry.
pub const MAX_BUNDLE_ENTRIES: usize = 1000;

/// A FHIR RESTful interaction, as the R4 HTTP page names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Read,
    Vread,
    Update,
    Patch,
    Delete,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Create,
    SearchType,
    SearchSystem,
    SearchCompartment,
    Capabilities,
    Batch,
    Transaction,
    Operation,
}

impl Interaction {
    /// Every interaction, for enumerating metric labels at start-up.
    pub const ALL: [Interaction; 16] = [
        Interaction::Read,
        Interaction::Vread,
        Interaction::Update,
        Interaction::Patch,
        Interaction::Delete,
        Interaction::HistoryInstance,
        Interaction::HistoryType,
        Interaction::HistorySystem,
        Interaction::Create,
        Interaction::SearchType,
        Interaction::SearchSystem,
        Interaction::SearchCompartment,
        Interaction::Capabilities,
        Interaction::Batch,
        Interaction::Transaction,
        Interaction::Operation,
    ];

    /// The name used in audit records, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::Create => "create",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::SearchCompartment => "search-compartment",
            Interaction::Capabilities => "capabilities",
            Interaction::Batch => "batch",
            Interaction::Transaction => "transaction",
            Interaction::Operation => "operation",
        }
    }
}

impl fmt::Display for Interaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The level an operation is invoked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationLevel {
    System,
    Type,
    Instance,
}

/// `[base]/[type]/[id]/...` compartment reference of a compartment search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compartment {
    pub resource_type: String,
    pub id: String,
}

/// A classified FHIR request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirRequest {
    pub interaction: Interaction,
    /// The resource type acted on; `None` for system-level interactions.
    /// For a compartment search this is the type searched for, `None` for `*`.
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub version_id: Option<String>,
    pub compartment: Option<Compartment>,
    /// Operation name without the `$`, with its level.
    pub operation: Option<(String, OperationLevel)>,
    /// Conditional create/update/patch/delete (the server runs a search).
    pub conditional: bool,
    /// A conditional create's search (`If-None-Exist`, or an entry's
    /// `request.ifNoneExist`), decoded like a query: decided like one.
    pub condition: Vec<(String, String)>,
    /// Searches the server runs to resolve conditional references
    /// (`"reference": "Patient?identifier=…"`) in a Bundle entry's resource:
    /// the type searched (`None` if not a resource type) and the
    /// parameters. Decided like queries.
    pub reference_searches: Vec<ReferenceSearch>,
    /// Decoded query parameters, in order, then a form `_search` body's.
    pub params: Vec<(String, String)>,
    /// How many of `params`, at the end, came from a form body. Such a
    /// parameter counts for every check but never as the one that confines
    /// a search (to the patient, or to a scope's filter): fhirwall then
    /// adds that to the query, which every server reads.
    pub form_params: usize,
    /// Entries of a batch or transaction Bundle, each classified.
    pub entries: Vec<FhirRequest>,
    /// The path below the FHIR base that was classified, decoded and
    /// without a trailing `/` (for an entry: its `request.url`'s path), so
    /// that policy rules on paths see an entry's path whole.
    pub path: String,
}

/// The search behind one conditional reference (`Type?params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceSearch {
    /// The type searched; `None` when it is not a resource type.
    pub resource_type: Option<String>,
    pub params: Vec<(String, String)>,
}

impl FhirRequest {
    fn new(interaction: Interaction) -> Self {
        FhirRequest {
            interaction,
            resource_type: None,
            id: None,
            version_id: None,
            compartment: None,
            operation: None,
            conditional: false,
            condition: Vec::new(),
            reference_searches: Vec::new(),
            params: Vec::new(),
            form_params: 0,
            entries: Vec::new(),
            path: String::new(),
        }
    }

    /// The query's parameters (without a form body's).
    pub fn query_params(&self) -> &[(String, String)] {
        &self.params[..self.params.len().saturating_sub(self.form_params)]
    }

    /// True when this is a batch or transaction whose body must be read to classify it.
    pub fn is_bundle(&self) -> bool {
        matches!(
            self.interaction,
            Interaction::Batch | Interaction::Transaction
        )
    }

    /// Refuses a request, or a Bundle entry, carrying more than `max`
    /// parameters (its query's, its form's and its `If-None-Exist`
    /// search's). A server stops reading parameters at a limit of its own
    /// (Tomcat's `maxParameterCount`: current versions drop those past
    /// 1000 without failing the request), so one well below it keeps every
    /// parameter fhirwall decided on — the patient it narrowed a search
    /// to above all — in what the server reads.
    pub fn within_parameter_limit(&self, max: usize) -> Result<(), ClassifyError> {
        let over = |r: &FhirRequest| {
            let count = r.params.len() + r.condition.len();
            (count > max).then_some(ClassifyError::TooManyParameters { count, max })
        };
        if let Some(e) = over(self) {
            return Err(e);
        }
        match self
            .entries
            .iter()
            .enumerate()
            .find_map(|(i, e)| over(e).map(|x| (i, x)))
        {
            Some((index, reason)) => Err(ClassifyError::BadEntry {
                index,
                reason: Box::new(reason),
            }),
            None => Ok(()),
        }
    }
}

/// Why a request could not be classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("unknown FHIR R4 resource type '{0}'")]
    UnknownResourceType(String),
    #[error("malformed resource id '{0}' (FHIR ids are 1-64 characters of A-Z a-z 0-9 - .)")]
    MalformedId(String),
    #[error("malformed path: {0}")]
    MalformedPath(String),
    #[error("method {method} is not a FHIR interaction on {what}")]
    MethodNotAllowed { method: String, what: String },
    #[error("malformed query string: {0}")]
    MalformedQuery(String),
    #[error("malformed Bundle: {0}")]
    MalformedBundle(String),
    #[error("the {what} is not JSON fhirwall can read: {reason}")]
    UnreadableBody { what: String, reason: String },
    #[error(
        "fhirwall reads what a {interaction} writes as JSON, to decide the conditional \
         references in it, and cannot read '{media}'"
    )]
    UnreadableMediaType {
        interaction: Interaction,
        media: String,
    },
    #[error(
        "{count} parameters, more than server.max_parameters ({max}): a server that stops \
         reading parameters at a limit of its own would leave out some that fhirwall decided on"
    )]
    TooManyParameters { count: usize, max: usize },
    #[error(
        "the id '{0}' is a number written with leading zeros or with other than ASCII \
         digits: the upstream may read it as the number (HAPI reads all-digit ids as its \
         database keys), another id than fhirwall would decide on and record; write it as \
         the plain number (a server whose ids have leading zeros: \
         upstream.allow_zero_padded_ids)"
    )]
    ZeroPaddedId(String),
    #[error("Bundle entry {index}: {reason}")]
    BadEntry {
        index: usize,
        reason: Box<ClassifyError>,
    },
}

/// What the classifier needs to know about the HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Path below the FHIR base, already percent-decoded and normalised by
    /// the route stage, without a leading `/` (empty for the base itself).
    pub path: &'a str,
    /// Raw query string (not decoded), without the `?`.
    pub query: Option<&'a str>,
    /// Value of the `If-None-Exist` header (conditional create).
    pub if_none_exist: Option<&'a str>,
}

/// A FHIR resource id: 1 to 64 of `A-Z a-z 0-9 - .`, not dots alone (a
/// URL's `.` and `..` are dot segments, which a server resolving the URL
/// removes: `Patient/.?name=x` runs as a search of Patients).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.bytes().all(|b| b == b'.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An operation's path segment: `$` and a name of letters, digits, `-`
/// and `_`.
pub fn is_valid_operation(seg: &str) -> bool {
    seg.len() > 1
        && seg.len() <= 64
        && seg.starts_with('$')
        && seg[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn resource_type(seg: &str) -> Result<String, ClassifyError> {
    if is_resource_type(seg) {
        Ok(seg.to_string())
    } else {
        Err(ClassifyError::UnknownResourceType(seg.to_string()))
    }
}

fn id(seg: &str) -> Result<String, ClassifyError> {
    if is_valid_id(seg) {
        Ok(seg.to_string())
    } else {
        Err(ClassifyError::MalformedId(seg.to_string()))
    }
}

/// An id `req` names that a server reading all-digit ids as numbers
/// would take for another: digits with leading zeros (`0123`) or digits
/// other than ASCII's (`١٢٣`). HAPI's JPA server reads an all-digit id as
/// its database key (Java's `isNumeric`, `parseLong`: any length, any
/// Unicode digit), so both are 123 there, while fhirwall would decide,
/// audit and match `path` rules by what was written. Looked at: its own
/// id, its compartment's and its entries', `_id` values, and `patients`,
/// every value naming a patient (`decide::each_patient_named`).
pub fn numeric_alias<'a>(req: &'a FhirRequest, patients: &[&'a str]) -> Option<&'a str> {
    let alias = |id: &&str| {
        id.chars().all(char::is_numeric) && (!id.is_ascii() || id.len() > 1 && id.starts_with('0'))
    };
    std::iter::once(req)
        .chain(&req.entries)
        .flat_map(|r| {
            r.id.as_deref()
                .into_iter()
                .chain(r.compartment.as_ref().map(|c| c.id.as_str()))
                .chain(
                    r.params
                        .iter()
                        .chain(&r.condition)
                        .filter(|(n, _)| n == "_id")
                        .flat_map(|(_, v)| v.split(',')),
                )
        })
        .chain(patients.iter().copied())
        .find(alias)
}

/// Decodes an `application/x-www-form-urlencoded` string (a query string or
/// a `_search` form body) into name/value pairs. `+` is a space.
pub fn parse_params(raw: &str) -> Result<Vec<(String, String)>, ClassifyError> {
    let mut out = Vec::new();
    // Messages never show a name or value: they reach the audit record,
    // and what is typed where a name goes is often a value (`?Smith`).
    for (n, pair) in raw.split('&').enumerate() {
        if pair.is_empty() {
            continue;
        }
        let n = n + 1;
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Result<String, ClassifyError> {
            let s = s.replace('+', " ");
            percent_decode_str(&s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    ClassifyError::MalformedQuery(format!(
                        "parameter {n} is not valid UTF-8 once percent-decoded"
                    ))
                })
        };
        let name = decode(name)?;
        if name.is_empty() {
            return Err(ClassifyError::MalformedQuery(
                "parameter with an empty name".into(),
            ));
        }
        if !is_param_name(&name) {
            return Err(ClassifyError::MalformedQuery(format!(
                "parameter {n} is not a search parameter name (letters, digits and _ - . : \
                 only; not shown, as it may be a value typed where a name goes)"
            )));
        }
        // HAPI splits a name's qualifier at its first `:` or `.`:
        // `_include.x` is an `_include` there, a chain here.
        if name.starts_with('_') && name.split(':').next().is_some_and(|b| b.contains('.')) {
            return Err(ClassifyError::MalformedQuery(format!(
                "parameter '{name}': a '.' in a parameter starting with '_' (the server would \
                 read what follows as a qualifier of the name before it)"
            )));
        }
        // Read as the request's method by servlet filters some servers
        // run (Spring's HiddenHttpMethodFilter): a POST would become a
        // DELETE there.
        if name == "_method" {
            return Err(ClassifyError::MalformedQuery(
                "parameter '_method' is not accepted: a server may read it as the request's \
                 method"
                    .into(),
            ));
        }
        let value = decode(value)?;
        if value.chars().any(char::is_control) {
            return Err(ClassifyError::MalformedQuery(format!(
                "the value of parameter '{name}' holds a control character"
            )));
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Whether `name` is spelt as FHIR search parameter names, modifiers,
/// chains and `_has` are (`_include:iterate`, `subject:Patient.name`,
/// `_has:Observation:patient:code`). Anything else is refused rather than
/// left for the upstream to read otherwise: HAPI drops a leading `?`
/// (`Observation??_include=…`), and the parser of its batch entries and
/// match URLs trims whitespace around names, so `?_include` or
/// `\t_include`, names fhirwall would not know, become `_include` there.
pub fn is_param_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Whether `name` is a search parameter's name alone: no modifier, chain
/// or `_has` path (letters, digits, `_` and `-`).
pub fn is_plain_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn not_allowed(method: &str, what: &str) -> ClassifyError {
    ClassifyError::MethodNotAllowed {
        method: method.to_string(),
        what: what.to_string(),
    }
}

/// Classifies one request. A batch/transaction is returned with no entries:
/// call [`classify_bundle`] with its body.
pub fn classify(req: HttpRequest<'_>) -> Result<FhirRequest, ClassifyError> {
    let method = req.method;
    let params = match req.query {
        Some(q) => parse_params(q)?,
        None => Vec::new(),
    };
    let segs: Vec<&str> = if req.path.is_empty() {
        Vec::new()
    } else {
        req.path.split('/').collect()
    };
    if segs.iter().any(|s| s.is_empty()) {
        return Err(ClassifyError::MalformedPath("empty path segment".into()));
    }
    let is_get = matches!(method, "GET" | "HEAD");
    let mut r = match segs.as_slice() {
        [] => match method {
            _ if is_get => FhirRequest::new(Interaction::SearchSystem),
            // The kind (batch or transaction) comes from the body.
            "POST" => FhirRequest::new(Interaction::Batch),
            _ => return Err(not_allowed(method, "the FHIR base")),
        },
        ["metadata"] if is_get => FhirRequest::new(Interaction::Capabilities),
        ["metadata"] => return Err(not_allowed(method, "metadata")),
        ["_search"] if is_get || method == "POST" => FhirRequest::new(Interaction::SearchSystem),
        ["_history"] if is_get => FhirRequest::new(Interaction::HistorySystem),
        [op] if is_valid_operation(op) => operation(method, op, OperationLevel::System)?,
        [t] => {
            let t = resource_type(t)?;
            let mut r = match method {
                "GET" | "HEAD" => FhirRequest::new(Interaction::SearchType),
                "POST" => {
                    let mut r = FhirRequest::new(Interaction::Create);
                    if let Some(search) = req.if_none_exist {
                        r.conditional = true;
                        r.condition = condition_params(search)?;
                    }
                    r
                }
                "PUT" | "PATCH" | "DELETE" => {
                    if params.is_empty() {
                        return Err(ClassifyError::MalformedPath(format!(
                            "{method} on a resource type needs an id or search parameters (conditional {})",
                            method.to_ascii_lowercase()
                        )));
                    }
                    let mut r = FhirRequest::new(match method {
                        "PUT" => Interaction::Update,
                        "PATCH" => Interaction::Patch,
                        _ => Interaction::Delete,
                    });
                    r.conditional = true;
                    r
                }
                _ => return Err(not_allowed(method, "a resource type")),
            };
            r.resource_type = Some(t);
            r
        }
        [t, "_search"] if is_get || method == "POST" => {
            let mut r = FhirRequest::new(Interaction::SearchType);
            r.resource_type = Some(resource_type(t)?);
            r
        }
        [t, "_history"] if is_get => {
            let mut r = FhirRequest::new(Interaction::HistoryType);
            r.resource_type = Some(resource_type(t)?);
            r
        }
        [t, op] if is_valid_operation(op) => {
            let mut r = operation(method, op, OperationLevel::Type)?;
            r.resource_type = Some(resource_type(t)?);
            r
        }
        [t, i] => {
            let t = resource_type(t)?;
            let i = id(i)?;
            let mut r = FhirRequest::new(match method {
                "GET" | "HEAD" => Interaction::Read,
                "PUT" => Interaction::Update,
                "PATCH" => Interaction::Patch,
                "DELETE" => Interaction::Delete,
                _ => return Err(not_allowed(method, "a resource instance")),
            });
            r.resource_type = Some(t);
            r.id = Some(i);
            r
        }
        [t, i, "_history"] if is_get => {
            let mut r = FhirRequest::new(Interaction::HistoryInstance);
            r.resource_type = Some(resource_type(t)?);
            r.id = Some(id(i)?);
            r
        }
        [t, i, "_history", v] if is_get => {
            let mut r = FhirRequest::new(Interaction::Vread);
            r.resource_type = Some(resource_type(t)?);
            r.id = Some(id(i)?);
            r.version_id = Some(id(v)?);
            r
        }
        [t, i, op] if is_valid_operation(op) => {
            let mut r = operation(method, op, OperationLevel::Instance)?;
            r.resource_type = Some(resource_type(t)?);
            r.id = Some(id(i)?);
            r
        }
        [t, i, target] | [t, i, target, "_search"]
            if (is_get || (segs.len() == 4 && method == "POST")) && !target.starts_with('_') =>
        {
            let ct = resource_type(t)?;
            if !COMPARTMENT_TYPES.contains(&ct.as_str()) {
                return Err(ClassifyError::MalformedPath(format!(
                    "{ct} does not define a compartment; compartment searches exist for {}",
                    COMPARTMENT_TYPES.join(", ")
                )));
            }
            let mut r = FhirRequest::new(Interaction::SearchCompartment);
            r.compartment = Some(Compartment {
                resource_type: ct,
                id: id(i)?,
            });
            r.resource_type = if *target == "*" {
                None
            } else {
                Some(resource_type(target)?)
            };
            r
        }
        _ => {
            return Err(ClassifyError::MalformedPath(format!(
                "'{}' with method {method} is not a FHIR RESTful interaction",
                req.path
            )))
        }
    };
    r.params = params;
    r.path = req.path.to_string();
    Ok(r)
}

/// The search of a conditional create (`If-None-Exist`) or a conditional
/// reference, read as servers read it: HAPI drops all up to the first `?`
/// (`Patient?identifier=1`, `?identifier=1`), so the parameters are what
/// follows it. A `?` left in a name is refused: it would hide a parameter
/// from the decision.
fn condition_params(search: &str) -> Result<Vec<(String, String)>, ClassifyError> {
    let query = search.split_once('?').map_or(search, |(_, q)| q);
    // A '?' left in a name (`Patient?_has:…` read from after a second
    // '?') is refused by parse_params with every other odd name.
    parse_params(query)
}

fn operation(method: &str, seg: &str, level: OperationLevel) -> Result<FhirRequest, ClassifyError> {
    if !matches!(method, "GET" | "HEAD" | "POST") {
        return Err(not_allowed(method, "an operation"));
    }
    let mut r = FhirRequest::new(Interaction::Operation);
    r.operation = Some((seg[1..].to_string(), level));
    Ok(r)
}

/// Classifies the body of a `POST [base]` request: a JSON Bundle of type
/// `batch` or `transaction`, each entry classified by its `request`.
/// Returns the request with its interaction set and its entries filled in.
pub fn classify_bundle(mut base: FhirRequest, body: &[u8]) -> Result<FhirRequest, ClassifyError> {
    let bundle = super::strict_json::parse(body)
        .map_err(|e| ClassifyError::MalformedBundle(format!("body is not JSON: {e}")))?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ClassifyError::MalformedBundle(
            "POST to the FHIR base must carry a Bundle (resourceType \"Bundle\")".into(),
        ));
    }
    base.interaction = match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => Interaction::Batch,
        Some("transaction") => Interaction::Transaction,
        Some(other) => {
            return Err(ClassifyError::MalformedBundle(format!(
                "Bundle.type '{other}' cannot be posted to the base; only batch and transaction"
            )))
        }
        None => {
            return Err(ClassifyError::MalformedBundle(
                "Bundle.type is missing".into(),
            ))
        }
    };
    let entries = match bundle.get("entry") {
        None => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => {
            return Err(ClassifyError::MalformedBundle(
                "Bundle.entry is not an array".into(),
            ))
        }
    };
    if entries.len() > MAX_BUNDLE_ENTRIES {
        return Err(ClassifyError::MalformedBundle(format!(
            "{} entries, more than the {MAX_BUNDLE_ENTRIES} allowed",
            entries.len()
        )));
    }
    base.entries = entries
        .iter()
        .enumerate()
        .map(|(index, e)| {
            classify_entry(e).map_err(|reason| ClassifyError::BadEntry {
                index,
                reason: Box::new(reason),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(base)
}

fn classify_entry(entry: &Value) -> Result<FhirRequest, ClassifyError> {
    let request = entry
        .get("request")
        .ok_or_else(|| ClassifyError::MalformedBundle("entry has no request".into()))?;
    // HAPI's parser is lenient about shapes (a one-element array for a
    // single value, an object for an array): a member fhirwall would read
    // as absent could be read there. So each member it decides on must
    // have its FHIR shape.
    if !request.is_object() {
        return Err(ClassifyError::MalformedBundle(
            "entry.request is not an object".into(),
        ));
    }
    if entry.get("resource").is_some_and(|r| !r.is_object()) {
        return Err(ClassifyError::MalformedBundle(
            "entry.resource is not an object".into(),
        ));
    }
    for key in ["ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince"] {
        if request.get(key).is_some_and(|v| !v.is_string()) {
            return Err(ClassifyError::MalformedBundle(format!(
                "entry.request.{key} is not a string"
            )));
        }
    }
    // HAPI reads a PATCH entry's ifMatch as a match URL when it is one: a
    // conditional patch on whatever the search finds. Only a version tag
    // is accepted.
    if let Some(tag) = request.get("ifMatch").and_then(Value::as_str) {
        if !is_entity_tag(tag) {
            return Err(ClassifyError::MalformedBundle(format!(
                "entry.request.ifMatch '{}' is not an entity tag (W/\"1\")",
                tag.escape_default()
            )));
        }
    }
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| ClassifyError::MalformedBundle("entry.request.method is missing".into()))?;
    if !matches!(method, "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") {
        return Err(ClassifyError::MalformedBundle(format!(
            "entry.request.method '{method}' is not an HTTP verb FHIR allows"
        )));
    }
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ClassifyError::MalformedBundle("entry.request.url is missing".into()))?;
    // What messages show of the URL: its path only (a query may hold a
    // name or a birth date), marked when a query was cut.
    let shown: String = {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let mut shown: String = path.chars().take(200).collect();
        if !query.is_empty() {
            shown.push_str("?…");
        }
        shown
    };
    if url.contains("://") || url.starts_with('/') || url.contains('#') {
        return Err(ClassifyError::MalformedBundle(format!(
            "entry.request.url '{shown}' must be relative to the FHIR base"
        )));
    }
    let (raw_path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    // Servers run an entry's path as written (HAPI does not decode it,
    // or decodes its segments apart): `Observation%2Fo1`, `o%31`.
    if raw_path.contains('%') {
        return Err(ClassifyError::MalformedBundle(format!(
            "entry.request.url '{shown}' has a percent-encoded path: an entry's path is \
             read as written"
        )));
    }
    let path = raw_path;
    // (A `.` segment is no id, type or operation: see is_valid_id.)
    if path.contains("..") || path.contains(';') || path.contains('\\') {
        return Err(ClassifyError::MalformedBundle(format!(
            "entry.request.url '{shown}' is not a plain path"
        )));
    }
    // HAPI reads `PUT Patient/p1/` as the id `p1/`, which is no id: what
    // fhirwall would prove (Patient/p1) is not what runs. Reads and
    // searches split on '/' alike on both sides; a POST names its type.
    if path.ends_with('/') && matches!(method, "PUT" | "PATCH" | "DELETE") {
        return Err(ClassifyError::MalformedBundle(format!(
            "entry.request.url '{shown}' ends with '/': a {method} entry names its resource \
             as Type/id"
        )));
    }
    let if_none_exist = request.get("ifNoneExist").and_then(Value::as_str);
    let mut r = classify(HttpRequest {
        method,
        path: path.trim_end_matches('/'),
        query,
        if_none_exist,
    })?;
    if matches!(r.interaction, Interaction::Batch | Interaction::Transaction) {
        return Err(ClassifyError::MalformedBundle(
            "a Bundle entry cannot itself be a batch or transaction".into(),
        ));
    }
    // Servers process entries by method and resource, not by URL alone
    // (e.g. HAPI creates whatever resource a POST entry carries): an entry's
    // resource must be exactly what its URL says is written, and only
    // writes carry one.
    let resource_type = entry
        .get("resource")
        .map(|res| res.get("resourceType").and_then(Value::as_str));
    match (method, resource_type) {
        ("POST", _) if r.interaction != Interaction::Create => {
            return Err(ClassifyError::MalformedBundle(format!(
                "a POST entry must create a resource at '[type]', not '{shown}' ({}): \
                 searches in a Bundle use GET, operations are not accepted in Bundles",
                r.interaction
            )))
        }
        ("POST" | "PUT", Some(t)) if t != r.resource_type.as_deref() => {
            return Err(ClassifyError::MalformedBundle(format!(
                "the entry's resource is a {} but its URL '{shown}' writes a {}",
                t.unwrap_or("(no resourceType)"),
                r.resource_type.as_deref().unwrap_or("(nothing)")
            )))
        }
        ("POST" | "PUT", None) => {
            return Err(ClassifyError::MalformedBundle(format!(
                "the {method} entry for '{shown}' carries no resource"
            )))
        }
        ("GET" | "HEAD" | "DELETE", Some(_)) => {
            return Err(ClassifyError::MalformedBundle(format!(
                "a {method} entry ('{shown}') may not carry a resource"
            )))
        }
        _ => {}
    }
    if let Some(resource) = entry.get("resource") {
        let patch = r.interaction == Interaction::Patch;
        // A JSON Patch travels in a Bundle as a Binary's base64 data.
        let decoded;
        let written =
            if patch && resource.get("resourceType").and_then(Value::as_str) == Some("Binary") {
                decoded = binary_patch(resource).map_err(|why| {
                    ClassifyError::MalformedBundle(format!(
                        "the PATCH entry for '{shown}' carries a Binary whose data {why}"
                    ))
                })?;
                &decoded
            } else {
                resource
            };
        r.reference_searches
            .extend(written_references(written, patch)?);
    }
    Ok(r)
}

/// Whether a body is a FHIR Parameters resource carrying no parameter
/// (`{"resourceType":"Parameters"}`, as HAPI's client sends an operation
/// invoked with none), or nothing at all.
pub fn is_empty_parameters(body: &[u8]) -> bool {
    if body.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    let Ok(v) = super::strict_json::parse(body) else {
        return false;
    };
    let Some(o) = v.as_object() else {
        return false;
    };
    o.get("resourceType").and_then(Value::as_str) == Some("Parameters")
        && o.iter().all(|(k, v)| match k.as_str() {
            "resourceType" | "id" | "meta" => true,
            "parameter" => v.as_array().is_some_and(Vec::is_empty),
            _ => false,
        })
}

/// `W/"x"` or `"x"`, with no quote inside.
fn is_entity_tag(tag: &str) -> bool {
    let t = tag.trim();
    let opaque = t.strip_prefix("W/").unwrap_or(t);
    opaque.len() >= 2
        && opaque.starts_with('"')
        && opaque.ends_with('"')
        && !opaque[1..opaque.len() - 1].contains('"')
}

/// The JSON Patch a Bundle's PATCH entry carries as a Binary's data.
fn binary_patch(binary: &Value) -> Result<Value, String> {
    use base64::Engine as _;
    let data = binary
        .get("data")
        .and_then(Value::as_str)
        .ok_or("is missing")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("is not base64: {e}"))?;
    super::strict_json::parse(&bytes).map_err(|e| format!("is not JSON fhirwall can read: {e}"))
}

/// Whether the server stores what the request's body holds (a create, an
/// update or a patch), resolving the conditional references in it.
pub fn writes_resource(req: &FhirRequest) -> bool {
    matches!(
        req.interaction,
        Interaction::Create | Interaction::Update | Interaction::Patch
    )
}

/// A `Content-Type`'s media type, lower case, without parameters (empty
/// when there is none).
pub fn media_type(content_type: Option<&str>) -> String {
    content_type
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Whether fhirwall reads a request's body to classify it: a form (its
/// parameters), or what is POSTed to the base (a Bundle) or to
/// `…/_search`.
pub fn body_classifies(method: &str, rel: &str, is_form: bool) -> bool {
    is_form || (method == "POST" && (rel.is_empty() || rel.ends_with("_search")))
}

/// Why a body read to classify a request (see [`body_classifies`]) that is
/// neither a form nor a Bundle is refused: a search's body is read for
/// parameters only as a form, and a server may read other bodies
/// (multipart/form-data) for parameters fhirwall would not have seen.
pub fn not_a_form(interaction: Interaction, content_type: Option<&str>) -> String {
    format!(
        "the body of a {interaction} must be a form (application/x-www-form-urlencoded), not '{}'",
        media_type(content_type).escape_default()
    )
}

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// Not a form fhirwall can read.
    Malformed(ClassifyError),
    /// It carries `access_token` (RFC 6750 §2.2, not accepted).
    AccessToken,
    /// A form is the body of a search by POST only.
    NotASearch(String),
}

/// Adds the parameters of `form`, the body of `fhir` (sent by `method` to
/// `rel`), as a server reads them: a form is a search's body only in
/// `POST …/_search` (on a GET a server reads the query alone), where its
/// parameters count like the query's, but never as what confines the
/// search (see [`FhirRequest::form_params`]).
pub fn add_form(
    fhir: &mut FhirRequest,
    method: &str,
    rel: &str,
    form: &str,
) -> Result<(), FormError> {
    let params = parse_params(form).map_err(FormError::Malformed)?;
    if params.iter().any(|(n, _)| n == "access_token") {
        return Err(FormError::AccessToken);
    }
    let searches = matches!(
        fhir.interaction,
        Interaction::SearchType | Interaction::SearchSystem | Interaction::SearchCompartment
    );
    if !(searches && method == "POST" && rel.ends_with("_search")) {
        return Err(FormError::NotASearch(format!(
            "a form-encoded body is accepted only as the body of POST …/_search, not for a {} \
             by {method}",
            fhir.interaction
        )));
    }
    fhir.form_params = params.len();
    fhir.params.extend(params);
    Ok(())
}

/// Whether a request's body is a form (`application/x-www-form-urlencoded`),
/// whose parameters count as search parameters. Refused (`Err` says why):
/// the media type in another case (servers match it exactly and would
/// leave the body unread), a Content-Encoding, and a charset other than
/// UTF-8 (fhirwall reads forms as UTF-8, and a servlet container decodes
/// them in the charset named, so a UTF-16 `_include` would be noise here
/// and a parameter there).
pub fn form_body(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
) -> Result<bool, String> {
    const FORM: &str = "application/x-www-form-urlencoded";
    let Some(ct) = content_type else {
        return Ok(false);
    };
    // HAPI takes a body for form parameters when the Content-Type merely
    // starts with the form type (`…urlencodedX`, `…urlencoded, application/
    // fhir+json`): anything so spelt is a form here too, and must be one
    // exactly.
    let head = ct.trim_start().as_bytes();
    let starts =
        head.len() >= FORM.len() && head[..FORM.len()].eq_ignore_ascii_case(FORM.as_bytes());
    if !starts {
        return Ok(false);
    }
    // Servers match the form media type case-sensitively (HAPI, Tomcat):
    // another spelling is a body they leave unread.
    if ct.split(';').next().map(str::trim) != Some(FORM) {
        return Err(format!(
            "write the form media type as {FORM}, in lower case (servers leave \
             '{}' unread)",
            ct.escape_default()
        ));
    }
    // HAPI reads no form parameters from a request with any
    // Content-Encoding, `identity` too (`RestfulServer.handleRequest`).
    if let Some(e) = content_encoding {
        return Err(format!(
            "a form body is read without a Content-Encoding header, not with '{}' (servers \
             leave a form so sent unread)",
            e.escape_default()
        ));
    }
    if let Some(charset) = other_charset(ct) {
        return Err(format!(
            "a form body is read as UTF-8, not as charset '{}'",
            charset.escape_default()
        ));
    }
    Ok(true)
}

/// A `charset` parameter of a Content-Type that is not UTF-8, if any.
fn other_charset(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let charset = value.trim().trim_matches('"');
        (name.trim().eq_ignore_ascii_case("charset")
            && !charset.eq_ignore_ascii_case("utf-8")
            && !charset.eq_ignore_ascii_case("utf8"))
        .then_some(charset)
    })
}

/// Refuses a Content-Type that lists several media types, and a FHIR or
/// JSON body in a charset other than UTF-8 (`Err` says why). FHIR is UTF-8 only; fhirwall reads such bodies (Bundles, written
/// resources) as UTF-8, while a server decoding them in the charset named
/// could read other text (in Shift_JIS, bytes fhirwall reads inside one
/// string end it). Other media types (a Binary's raw content) keep theirs.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), String> {
    let Some(ct) = content_type else {
        return Ok(());
    };
    // One media type: servers read a list each their own way (HAPI takes
    // the body as a form if the list starts with one, and parses it as the
    // first FHIR type in it). HAPI splits at every comma, one inside a
    // quoted parameter too (`x="a, application/fhir+xml"`): none is taken.
    if ct.contains(',') {
        return Err(format!(
            "Content-Type names one media type, not a list ('{}')",
            ct.escape_default()
        ));
    }
    let media = media_type(Some(ct)).replace(' ', "+");
    if !(media.contains("json") || media.contains("fhir")) {
        return Ok(());
    }
    match other_charset(ct) {
        Some(charset) => Err(format!(
            "FHIR content is UTF-8, not charset '{}'",
            charset.escape_default()
        )),
        None => Ok(()),
    }
}

/// Whether the body of a single create, update or patch is read for
/// conditional references (`"reference": "Patient?identifier=…"`). It must
/// be JSON (`Content-Type` absent, `application/json` or `…+json`), not
/// content-encoded; another format or an encoding is refused. A Binary
/// sent under a media type that names no FHIR format is raw content (an
/// image, a PDF, a C-CDA document as `text/xml`), holding no references:
/// `Ok(false)`. The media type is read as HAPI reads it (spaces are `+`:
/// `application/fhir json` is FHIR JSON), case ignored.
pub fn reads_written_body(
    req: &FhirRequest,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
) -> Result<bool, ClassifyError> {
    // Read as HAPI reads it: a space is a `+`.
    let media = media_type(content_type).replace(' ', "+");
    let names_fhir = media.contains("fhir") || media.contains("turtle");
    if req.resource_type.as_deref() == Some("Binary") && !names_fhir {
        return Ok(false);
    }
    // `application/json+fhir` is FHIR JSON's name before R4.
    let json = media.is_empty()
        || media == "application/json"
        || media == "application/json+fhir"
        || media.ends_with("+json");
    if !json {
        return Err(ClassifyError::UnreadableMediaType {
            interaction: req.interaction,
            media,
        });
    }
    match content_encoding.map(str::trim) {
        None => Ok(true),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(true),
        Some(e) => Err(ClassifyError::UnreadableMediaType {
            interaction: req.interaction,
            media: format!("{media} with Content-Encoding {e}"),
        }),
    }
}

/// Reads the JSON body of a single create, update or patch for conditional
/// references. The server resolves each by a search, and whether the write
/// succeeds tells what the search found: each becomes one of
/// `reference_searches`, decided like a query. Repeated keys are refused,
/// so that the body means to fhirwall what it means to the server.
pub fn classify_written_body(
    mut req: FhirRequest,
    body: &[u8],
) -> Result<FhirRequest, ClassifyError> {
    if body.is_empty() {
        return Ok(req);
    }
    let doc = super::strict_json::parse(body).map_err(|e| ClassifyError::UnreadableBody {
        what: format!("body of the {}", req.interaction),
        reason: e.to_string(),
    })?;
    let patch = req.interaction == Interaction::Patch;
    req.reference_searches
        .extend(written_references(&doc, patch)?);
    Ok(req)
}

/// A raw Binary's `X-Security-Context` header: the server stores it as the
/// Binary's `securityContext` reference, and resolves it if conditional.
pub fn security_context_reference(
    mut req: FhirRequest,
    value: Option<&str>,
) -> Result<FhirRequest, ClassifyError> {
    if let Some(v) = value.filter(|v| v.contains('?')) {
        req.reference_searches.push(reference_search(v)?);
    }
    Ok(req)
}

/// The searches behind the conditional references (`Type?params`) in a
/// written resource: every `reference` value that holds a `?`. A
/// `reference` that is neither a string nor null is refused (a server may
/// take the first string of an array). A `patch` (JSON Patch, FHIRPath
/// Patch) can also put a bare string at a `reference`: such a value counts
/// the same, and a JSON Patch `copy` or `move` onto a `reference` (whose
/// value fhirwall cannot see) is refused.
pub fn written_references(doc: &Value, patch: bool) -> Result<Vec<ReferenceSearch>, ClassifyError> {
    let mut out = Vec::new();
    conditional_references(doc, &mut out)?;
    if patch {
        patched_references(doc, &mut out)?;
    }
    Ok(out)
}

fn conditional_references(v: &Value, out: &mut Vec<ReferenceSearch>) -> Result<(), ClassifyError> {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "reference" {
                    reference_value(value, out)?;
                } else {
                    conditional_references(value, out)?;
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                conditional_references(item, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A value that lands on a `reference`: a string (conditional when it
/// holds a `?`, as servers tell) or null; an object is an element named
/// `reference` that holds a Reference (`Consent.provision.data.reference`,
/// `Contract.term.asset.context.reference`), read like any other; anything
/// else is refused (named by its JSON type only: the value may be PHI).
fn reference_value(v: &Value, out: &mut Vec<ReferenceSearch>) -> Result<(), ClassifyError> {
    match v {
        Value::String(r) if r.contains('?') => out.push(reference_search(r)?),
        Value::String(_) | Value::Null => {}
        Value::Object(_) => conditional_references(v, out)?,
        _ => {
            let kind = match v {
                Value::Array(_) => "an array",
                Value::Number(_) => "a number",
                _ => "a boolean",
            };
            return Err(ClassifyError::UnreadableBody {
                what: "written resource".into(),
                reason: format!("a 'reference' is {kind}, not a string"),
            });
        }
    }
    Ok(())
}

/// The values a patch puts at a `reference`: a JSON Patch operation whose
/// `path` ends in `/reference`, a FHIRPath Patch operation whose `path`
/// ends in `.reference` or whose `name` is `reference`.
fn patched_references(doc: &Value, out: &mut Vec<ReferenceSearch>) -> Result<(), ClassifyError> {
    let is_reference = |segment: &str| segment.trim().trim_matches('`') == "reference";
    match doc {
        // JSON Patch: an array of operations.
        Value::Array(ops) => {
            for op in ops {
                let path = op.get("path").and_then(Value::as_str).unwrap_or("");
                if !is_reference(path.rsplit('/').next().unwrap_or("")) {
                    continue;
                }
                match op.get("op").and_then(Value::as_str) {
                    Some(kind @ ("copy" | "move")) => {
                        return Err(ClassifyError::UnreadableBody {
                            what: "patch".into(),
                            reason: format!(
                                "a JSON Patch '{kind}' onto '{path}' sets a reference fhirwall \
                                 cannot read"
                            ),
                        })
                    }
                    _ => {
                        if let Some(v) = op.get("value") {
                            reference_value(v, out)?;
                        }
                    }
                }
            }
        }
        // FHIRPath Patch: a Parameters resource of `operation`s.
        Value::Object(_) => {
            // Read as HAPI's lenient parser reads it: one object where an
            // array is due is one element; a name that is no string is
            // refused (it could be read as "operation" there).
            fn elements(v: Option<&Value>) -> &[Value] {
                match v {
                    Some(Value::Array(a)) => a,
                    Some(o @ Value::Object(_)) => std::slice::from_ref(o),
                    _ => &[],
                }
            }
            fn named(p: &Value) -> Result<Option<&str>, ClassifyError> {
                match p.get("name") {
                    None => Ok(None),
                    Some(Value::String(n)) => Ok(Some(n.as_str())),
                    Some(_) => Err(ClassifyError::UnreadableBody {
                        what: "patch".into(),
                        reason: "a FHIRPath Patch parameter's name is not a string".into(),
                    }),
                }
            }
            let mut operations = Vec::new();
            for p in elements(doc.get("parameter")) {
                if named(p)? == Some("operation") {
                    operations.push(p);
                }
            }
            for operation in &operations {
                let parts = elements(operation.get("part"));
                for p in parts {
                    // The path and name an operation works on are strings.
                    if matches!(named(p)?, Some("path" | "name" | "type")) {
                        let odd = p
                            .as_object()
                            .into_iter()
                            .flatten()
                            .any(|(k, v)| k.starts_with("value") && !v.is_string());
                        if odd {
                            return Err(ClassifyError::UnreadableBody {
                                what: "patch".into(),
                                reason: "a FHIRPath Patch operation's path, name or type is \
                                         not a string"
                                    .into(),
                            });
                        }
                    }
                }
                let part = |name: &'static str| {
                    parts
                        .iter()
                        .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
                };
                let text = |name: &'static str| {
                    part(name)
                        .flat_map(|p| p.as_object().into_iter().flatten())
                        .filter(|(k, _)| k.starts_with("value"))
                        .find_map(|(_, v)| v.as_str())
                        .unwrap_or("")
                };
                let onto_reference = is_reference(text("path").rsplit('.').next().unwrap_or(""))
                    || is_reference(text("name"));
                if !onto_reference {
                    continue;
                }
                for value in part("value") {
                    for (key, v) in value.as_object().into_iter().flatten() {
                        if key.starts_with("value") {
                            reference_value(v, out)?;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The type a conditional reference searches, read as servers read it:
/// before the first `?`, after the last `/` (`Patient?…`, `Patient/?…`,
/// `[base]/Patient?…`), case ignored. `None` when it names no R4 type.
fn searched_type(r: &str) -> Option<&'static str> {
    let before = r.split_once('?').map_or(r, |(t, _)| t);
    let before = before.strip_suffix('/').unwrap_or(before);
    let ty = before.rsplit('/').next().unwrap_or(before);
    crate::fhir::resource_types::resource_type_ignoring_case(ty)
}

/// The search a conditional reference stands for. Split once, at the first
/// `?`, as servers do: a second split would hide what follows.
fn reference_search(r: &str) -> Result<ReferenceSearch, ClassifyError> {
    Ok(ReferenceSearch {
        resource_type: searched_type(r).map(str::to_string),
        params: condition_params(r)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: &str, path: &str, query: Option<&str>) -> Result<FhirRequest, ClassifyError> {
        classify(HttpRequest {
            method,
            path,
            query,
            if_none_exist: None,
        })
    }

    #[test]
    fn written_bodies_are_read_as_json_and_raw_binaries_are_not() {
        let create = |ty: &str| c("POST", ty, None).unwrap();
        for (ty, content_type, encoding, reads) in [
            ("Observation", None, None, Ok(true)),
            (
                "Observation",
                Some("application/fhir+json; charset=utf-8"),
                None,
                Ok(true),
            ),
            (
                "Observation",
                Some("Application/JSON"),
                Some("identity"),
                Ok(true),
            ),
            (
                "Observation",
                Some("application/json-patch+json"),
                None,
                Ok(true),
            ),
            ("Observation", Some("application/fhir+xml"), None, Err(())),
            ("Observation", Some("text/plain"), None, Err(())),
            (
                "Observation",
                Some("application/fhir+json"),
                Some("gzip"),
                Err(()),
            ),
            // A Binary's body is a resource only under a FHIR media type
            // (as HAPI decides); else it is raw content.
            ("Binary", Some("image/png"), None, Ok(false)),
            ("Binary", Some("application/pdf"), Some("gzip"), Ok(false)),
            ("Binary", Some("text/xml"), None, Ok(false)),
            ("Binary", Some("application/json"), None, Ok(false)),
            ("Binary", None, None, Ok(false)),
            ("Binary", Some("application/fhir+json"), None, Ok(true)),
            ("Binary", Some("application/fhir+xml"), None, Err(())),
            // Read as HAPI reads it: a space is a `+`.
            ("Binary", Some("application/fhir json"), None, Ok(true)),
            ("Binary", Some("application/json fhir"), None, Ok(true)),
            ("Binary", Some("Application/FHIR+JSON"), None, Ok(true)),
            ("Binary", Some("application/fhir+ndjson"), None, Err(())),
            ("Observation", Some("application/fhir json"), None, Ok(true)),
        ] {
            let got = reads_written_body(&create(ty), content_type, encoding).map_err(|e| {
                assert!(e.to_string().contains("cannot read"), "{e}");
            });
            assert_eq!(got, reads, "{ty} as {content_type:?} {encoding:?}");
        }
    }

    #[test]
    fn a_security_context_header_is_a_reference() {
        let create = || c("POST", "Binary", None).unwrap();
        let r = security_context_reference(create(), Some("Patient?identifier=a|1")).unwrap();
        assert_eq!(
            r.reference_searches[0].resource_type.as_deref(),
            Some("Patient")
        );
        let r = security_context_reference(create(), Some("Patient/1")).unwrap();
        assert!(r.reference_searches.is_empty());
        // (Two such headers are refused with their twins, in the proxy.)
    }

    #[test]
    fn what_a_patch_puts_at_a_reference_counts() {
        let refs = |patch: serde_json::Value| {
            written_references(&patch, true).map(|found| {
                found
                    .into_iter()
                    .map(|r| r.resource_type.unwrap_or_default())
                    .collect::<Vec<_>>()
            })
        };
        let set = |path: &str, value: &str| serde_json::json!([{"op": "replace", "path": path, "value": value}]);
        let fhirpath = |path: &str, name: Option<&str>, value: &str| {
            let mut parts = vec![
                serde_json::json!({"name": "type", "valueCode": "add"}),
                serde_json::json!({"name": "path", "valueString": path}),
                serde_json::json!({"name": "value", "valueString": value}),
            ];
            if let Some(n) = name {
                parts.push(serde_json::json!({"name": "name", "valueString": n}));
            }
            serde_json::json!({"resourceType": "Parameters",
                               "parameter": [{"name": "operation", "part": parts}]})
        };
        for (value, ty) in [
            ("Patient?identifier=a|1", "Patient"),
            ("patient?identifier=a|1", "Patient"),
            ("Patient/?identifier=a|1", "Patient"),
            (
                "http://other.example/fhir/Patient?identifier=a|1",
                "Patient",
            ),
            ("Tas\u{212A}?code=x", "Task"),
            // At a reference, any `?` makes a search (of a type fhirwall
            // cannot name: every type).
            ("?identifier=a|1", ""),
        ] {
            assert_eq!(
                refs(set("/focus/0/reference", value)).unwrap(),
                vec![ty],
                "{value}"
            );
            let add = fhirpath("Observation.focus[0]", Some("reference"), value);
            assert_eq!(refs(add).unwrap(), vec![ty], "{value}");
            let replace = fhirpath("Observation.focus[0].reference", None, value);
            assert_eq!(refs(replace).unwrap(), vec![ty], "{value}");
        }
        // A search whose parameter names no server would read as such is
        // refused, not guessed.
        assert!(refs(set("/focus/0/reference", "Not sure? Ask")).is_err());
        // Text elsewhere is text, whatever it says.
        for patch in [
            set("/note/0/text", "Patient? Not sure?"),
            set("/focus/0/reference", "Patient/1"),
            fhirpath("Observation.note[0].text", None, "patient?identifier=a|1"),
        ] {
            assert_eq!(
                refs(patch.clone()).unwrap(),
                Vec::<String>::new(),
                "{patch}"
            );
        }
        // A Reference object anywhere in a patch is read as in a resource.
        let p = serde_json::json!([{"op": "add", "path": "/focus",
                                    "value": [{"reference": "Patient?x=1"}]}]);
        assert_eq!(refs(p).unwrap(), vec!["Patient"]);
        // A copy or move onto a reference carries a value fhirwall cannot see.
        for op in ["copy", "move"] {
            let p = serde_json::json!([{"op": op, "from": "/note/0/text",
                                        "path": "/focus/0/reference"}]);
            assert!(
                refs(p).unwrap_err().to_string().contains("cannot read"),
                "{op}"
            );
        }
        let p = serde_json::json!([{"op": "copy", "from": "/note/0", "path": "/note/1"}]);
        assert!(refs(p).unwrap().is_empty());
        // A value at a reference must be a string.
        let p = serde_json::json!([{"op": "add", "path": "/focus/0/reference",
                                    "value": ["Patient?x=1"]}]);
        assert!(refs(p).unwrap_err().to_string().contains("not a string"));
    }

    #[test]
    fn written_bodies_yield_their_conditional_references() {
        let body = br#"{"resourceType": "Observation",
            "subject": {"reference": "Patient?identifier=a|1"},
            "performer": [{"reference": "Practitioner/9"},
                          {"reference": "http://elsewhere/Organization?name=x"}],
            "contained": [{"resourceType": "Device", "owner": {"reference": "?name=y"}}],
            "note": [{"text": "Patient?identifier=a|2 is only text"}]}"#;
        let r = classify_written_body(c("POST", "Observation", None).unwrap(), body).unwrap();
        let mut got: Vec<_> = r
            .reference_searches
            .iter()
            .map(|s| (s.resource_type.as_deref(), s.params.len()))
            .collect();
        got.sort();
        // Only `reference` values count in a resource (a note is text); a
        // reference whose type fhirwall cannot name searches every type.
        assert_eq!(
            got,
            vec![(None, 1), (Some("Organization"), 1), (Some("Patient"), 1)]
        );
        for (body, says) in [
            (
                &br#"{"subject": {"reference": "Patient?x=1", "reference": "Patient/1"}}"#[..],
                "twice",
            ),
            (b"<Observation/>", "not JSON"),
            (
                br#"{"subject": {"reference": "Patient?x?y=1"}}"#,
                "not a search parameter",
            ),
            // A server may take the first string of an array.
            (
                br#"{"focus": [{"reference": ["Patient?x=1"]}]}"#,
                "not a string",
            ),
        ] {
            let e = classify_written_body(c("PUT", "Observation/1", None).unwrap(), body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
        // An object where a string is due is an element named `reference`
        // holding a Reference (Consent.provision.data.reference): read as one.
        assert!(classify_written_body(
            c("PUT", "Observation/1", None).unwrap(),
            br#"{"focus": [{"reference": {"x": "Patient?x=1"}}]}"#
        )
        .unwrap()
        .reference_searches
        .is_empty());
        assert!(
            classify_written_body(c("PUT", "Observation/1", None).unwrap(), b"")
                .unwrap()
                .reference_searches
                .is_empty()
        );
    }

    #[test]
    fn interactions_table() {
        use Interaction::*;
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            Option<&'a str>,
            Interaction,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            (
                "read",
                "GET",
                "Patient/123",
                None,
                Read,
                Some("Patient"),
                Some("123"),
            ),
            (
                "head read",
                "HEAD",
                "Patient/123",
                None,
                Read,
                Some("Patient"),
                Some("123"),
            ),
            (
                "vread",
                "GET",
                "Observation/o1/_history/2",
                None,
                Vread,
                Some("Observation"),
                Some("o1"),
            ),
            (
                "update",
                "PUT",
                "Patient/123",
                None,
                Update,
                Some("Patient"),
                Some("123"),
            ),
            (
                "patch",
                "PATCH",
                "Patient/123",
                None,
                Patch,
                Some("Patient"),
                Some("123"),
            ),
            (
                "delete",
                "DELETE",
                "Patient/123",
                None,
                Delete,
                Some("Patient"),
                Some("123"),
            ),
            (
                "conditional update",
                "PUT",
                "Patient",
                Some("identifier=x|1"),
                Update,
                Some("Patient"),
                None,
            ),
            (
                "conditional delete",
                "DELETE",
                "Observation",
                Some("code=1"),
                Delete,
                Some("Observation"),
                None,
            ),
            (
                "conditional patch",
                "PATCH",
                "Observation",
                Some("code=1"),
                Patch,
                Some("Observation"),
                None,
            ),
            (
                "history instance",
                "GET",
                "Patient/1/_history",
                None,
                HistoryInstance,
                Some("Patient"),
                Some("1"),
            ),
            (
                "history type",
                "GET",
                "Patient/_history",
                None,
                HistoryType,
                Some("Patient"),
                None,
            ),
            (
                "history system",
                "GET",
                "_history",
                None,
                HistorySystem,
                None,
                None,
            ),
            (
                "create",
                "POST",
                "Observation",
                None,
                Create,
                Some("Observation"),
                None,
            ),
            (
                "search type",
                "GET",
                "Observation",
                Some("patient=1"),
                SearchType,
                Some("Observation"),
                None,
            ),
            (
                "search type POST",
                "POST",
                "Observation/_search",
                None,
                SearchType,
                Some("Observation"),
                None,
            ),
            (
                "search system",
                "GET",
                "",
                Some("_type=Patient"),
                SearchSystem,
                None,
                None,
            ),
            (
                "search system _search",
                "POST",
                "_search",
                None,
                SearchSystem,
                None,
                None,
            ),
            (
                "search compartment",
                "GET",
                "Patient/123/Observation",
                None,
                SearchCompartment,
                Some("Observation"),
                None,
            ),
            (
                "search compartment *",
                "GET",
                "Patient/123/*",
                None,
                SearchCompartment,
                None,
                None,
            ),
            (
                "capabilities",
                "GET",
                "metadata",
                None,
                Capabilities,
                None,
                None,
            ),
            ("batch or transaction", "POST", "", None, Batch, None, None),
            ("system op", "POST", "$export", None, Operation, None, None),
            (
                "type op",
                "GET",
                "Patient/$export",
                None,
                Operation,
                Some("Patient"),
                None,
            ),
            (
                "instance op",
                "GET",
                "Patient/1/$everything",
                None,
                Operation,
                Some("Patient"),
                Some("1"),
            ),
        ];
        for (name, m, p, q, i, t, id) in cases {
            let r = c(m, p, *q).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.interaction, *i, "{name}");
            assert_eq!(r.resource_type.as_deref(), *t, "{name}");
            assert_eq!(r.id.as_deref(), *id, "{name}");
        }
    }

    #[test]
    fn details() {
        let r = c("GET", "Patient/123/Observation", Some("code=a%20b&x=1+2")).unwrap();
        assert_eq!(
            r.compartment,
            Some(Compartment {
                resource_type: "Patient".into(),
                id: "123".into()
            })
        );
        assert_eq!(
            r.params,
            vec![("code".into(), "a b".into()), ("x".into(), "1 2".into())]
        );
        let r = c("GET", "Patient/1/$everything", None).unwrap();
        assert_eq!(
            r.operation,
            Some(("everything".into(), OperationLevel::Instance))
        );
        let r = classify(HttpRequest {
            method: "POST",
            path: "Patient",
            query: None,
            if_none_exist: Some("identifier=1"),
        })
        .unwrap();
        assert!(r.conditional);
        assert_eq!(r.interaction, Interaction::Create);
        let ine = |search| {
            classify(HttpRequest {
                method: "POST",
                path: "Patient",
                query: None,
                if_none_exist: Some(search),
            })
        };
        let names = |search| -> Vec<String> {
            ine(search)
                .unwrap()
                .condition
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        assert_eq!(names("identifier=1&name=a"), ["identifier", "name"]);
        assert_eq!(names("?identifier=1"), ["identifier"]);
        assert_eq!(
            names("Patient?_has:Condition:subject:code=x"),
            ["_has:Condition:subject:code"]
        );
        assert!(ine("Patient?a?b=1").is_err());
        assert!(ine("Patient?a%3Fb=1").is_err());
        assert!(
            c("PUT", "Patient", Some("identifier=1"))
                .unwrap()
                .conditional
        );
        assert_eq!(
            c("GET", "Observation/o/_history/7", None)
                .unwrap()
                .version_id
                .as_deref(),
            Some("7")
        );
    }

    #[test]
    fn refusals_table() {
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            ("unknown type", "GET", "Patientt/1", None),
            ("lowercase type", "GET", "patient/1", None),
            ("abstract type", "GET", "Resource/1", None),
            ("abstract DomainResource", "GET", "DomainResource", None),
            ("bad id chars", "GET", "Patient/a_b", None),
            (
                "id too long",
                "GET",
                "Patient/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                None,
            ),
            ("too deep", "GET", "Patient/1/Observation/2/x", None),
            ("empty segment", "GET", "Patient//1", None),
            ("PUT on type without params", "PUT", "Patient", None),
            ("DELETE on base", "DELETE", "", None),
            ("POST on instance", "POST", "Patient/1", None),
            ("OPTIONS", "OPTIONS", "Patient", None),
            ("non-compartment type", "GET", "Observation/1/Patient", None),
            ("compartment of unknown type", "GET", "Patient/1/Foo", None),
            ("DELETE history", "DELETE", "Patient/1/_history", None),
            ("bad operation name", "GET", "Patient/$ev!l", None),
            ("operation with PUT", "PUT", "Patient/1/$everything", None),
            ("unknown underscore", "GET", "Patient/1/_foo", None),
            ("metadata POST", "POST", "metadata", None),
            ("query bad utf8", "GET", "Patient", Some("name=%ff")),
            ("empty param name", "GET", "Patient", Some("=x")),
        ];
        for (name, m, p, q) in cases {
            assert!(
                c(m, p, *q).is_err(),
                "{name} should be refused: {:?}",
                c(m, p, *q)
            );
        }
    }

    #[test]
    fn bundles() {
        let base = c("POST", "", None).unwrap();
        let body = br#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"request":{"method":"GET","url":"Patient/1"}},
            {"request":{"method":"POST","url":"Observation","ifNoneExist":"identifier=1"},"resource":{"resourceType":"Observation"}},
            {"request":{"method":"GET","url":"Observation?patient=1&code=x"}},
            {"request":{"method":"DELETE","url":"Condition/c1"}}
        ]}"#;
        let r = classify_bundle(base.clone(), body).unwrap();
        assert_eq!(r.interaction, Interaction::Transaction);
        let kinds: Vec<_> = r.entries.iter().map(|e| e.interaction).collect();
        assert_eq!(
            kinds,
            vec![
                Interaction::Read,
                Interaction::Create,
                Interaction::SearchType,
                Interaction::Delete
            ]
        );
        assert!(r.entries[1].conditional);
        assert_eq!(r.entries[2].params.len(), 2);

        let batch = br#"{"resourceType":"Bundle","type":"batch","entry":[]}"#;
        assert_eq!(
            classify_bundle(base.clone(), batch).unwrap().interaction,
            Interaction::Batch
        );

        // Messages show an entry URL's path, never its query's values.
        for entry in [
            r#"{"request":{"method":"POST","url":"Patient/_search?name=Jane%20Doe"},"resource":{"resourceType":"Patient"}}"#,
            r#"{"request":{"method":"PUT","url":"Patient/1?name=Jane%20Doe"}}"#,
            r#"{"request":{"method":"GET","url":"Patient/1?name=Jane%20Doe"},"resource":{"resourceType":"Patient"}}"#,
            r#"{"request":{"method":"GET","url":"Patient/..;?name=Jane%20Doe"}}"#,
        ] {
            let body = format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{entry}]}}"#);
            let e = classify_bundle(base.clone(), body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(!e.contains("Jane") && e.contains("Patient"), "{e}");
            assert!(e.contains("?…"), "{e}");
        }

        let bad: &[(&str, &[u8])] = &[
            ("not json", b"<Bundle/>"),
            ("not a bundle", br#"{"resourceType":"Patient"}"#),
            ("searchset", br#"{"resourceType":"Bundle","type":"searchset"}"#),
            ("no type", br#"{"resourceType":"Bundle"}"#),
            ("entry not array", br#"{"resourceType":"Bundle","type":"batch","entry":{}}"#),
            ("no request", br#"{"resourceType":"Bundle","type":"batch","entry":[{}]}"#),
            ("absolute url", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"http://evil/Patient/1"}}]}"#),
            ("dotdot", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient/%2e%2e/Observation"}}]}"#),
            ("unknown type", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Foo/1"}}]}"#),
            ("nested bundle", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":""}}]}"#),
            ("bad verb", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"TRACE","url":"Patient"}}]}"#),
            // What a server would create regardless of the URL.
            ("post to _search", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":"Observation/_search"},"resource":{"resourceType":"Condition"}}]}"#),
            ("post to operation", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":"Patient/p1/$everything"},"resource":{"resourceType":"Condition"}}]}"#),
            ("post to compartment", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":"Patient/p1/Observation"},"resource":{"resourceType":"Observation"}}]}"#),
            ("create of another type", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":"Observation"},"resource":{"resourceType":"Condition"}}]}"#),
            ("update of another type", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"PUT","url":"Observation/1"},"resource":{"resourceType":"Condition"}}]}"#),
            ("create without resource", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST","url":"Observation"}}]}"#),
            ("get with resource", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Observation/1"},"resource":{"resourceType":"Observation"}}]}"#),
            ("delete with resource", br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Observation/1"},"resource":{"resourceType":"Observation"}}]}"#),
        ];
        for (name, body) in bad {
            assert!(
                classify_bundle(base.clone(), body).is_err(),
                "{name} should be refused"
            );
        }
    }

    #[test]
    fn parameter_names_are_spelt_as_fhir_spells_them_or_refused() {
        for name in [
            "_include",
            "_include:iterate",
            "_has:Observation:patient:code",
            "subject:Patient.name",
            "general-practitioner",
            "code:not-in",
            "_typeFilter",
        ] {
            let q = format!("{name}=x");
            assert_eq!(parse_params(&q).unwrap()[0].0, name);
        }
        // Names HAPI reads as `_include` (a leading `?` dropped, whitespace
        // around a name trimmed in batch entries and match URLs), and
        // others no server means by a search parameter.
        for query in [
            "?_include=Observation:subject:Patient",
            "%3F_include=Observation:subject:Patient",
            "%09_include=Observation:subject:Patient",
            "_include%09=Observation:subject:Patient",
            "+_revinclude=Provenance:target",
            "code=x&%5Finclude%20=Observation:subject",
            "%255Finclude=Observation:subject",
            "patient[]=1",
            "name;_include=x",
        ] {
            let e = parse_params(query).unwrap_err();
            assert!(
                e.to_string().contains("is not a search parameter name"),
                "{query}: {e}"
            );
        }
        // Control characters in a value are refused too (a server may trim
        // them away); spaces are values' own.
        assert!(parse_params("code=%09x").is_err());
        assert!(parse_params("code=x%0A").is_err());
        assert_eq!(parse_params("name=John+Smith").unwrap()[0].1, "John Smith");
        // The same in a query, a Bundle entry and a conditional create.
        assert!(c(
            "GET",
            "Observation",
            Some("?_include=Observation:subject:Patient")
        )
        .is_err());
        let base = c("POST", "", None).unwrap();
        let batch = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Observation?\t_include=Observation:subject:Patient"}}]}"#;
        assert!(classify_bundle(base, batch).is_err());
        let created = classify(HttpRequest {
            method: "POST",
            path: "Observation",
            query: None,
            if_none_exist: Some("identifier=1&\t_has:Observation:patient:code=x"),
        });
        assert!(created.is_err());
    }

    #[test]
    fn bodies_fhirwall_reads_are_utf8() {
        for ct in [
            "application/fhir+json",
            "application/fhir+json; charset=UTF-8",
            "application/json;charset=\"utf8\"",
            "text/plain; charset=iso-8859-1",
            "image/png",
        ] {
            assert!(check_content_type(Some(ct)).is_ok(), "{ct}");
        }
        for ct in [
            "application/fhir+json; charset=Shift_JIS",
            "application/json; charset=utf-16",
            "application/fhir json; charset=GBK",
        ] {
            assert!(check_content_type(Some(ct)).is_err(), "{ct}");
        }
        assert_eq!(
            form_body(
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                None
            ),
            Ok(true)
        );
        assert!(form_body(
            Some("application/x-www-form-urlencoded; charset=utf-16le"),
            None
        )
        .is_err());
        assert!(form_body(Some("Application/x-www-form-urlencoded"), None).is_err());
        assert!(form_body(Some("application/x-www-form-urlencoded"), Some("gzip")).is_err());
        // HAPI leaves a form with any Content-Encoding unread.
        assert!(form_body(Some("application/x-www-form-urlencoded"), Some("identity")).is_err());
        assert_eq!(form_body(Some("application/fhir+json"), None), Ok(false));
        // Spelt so HAPI would take it for a form: a form here, refused.
        assert!(form_body(Some("application/x-www-form-urlencodedX"), None).is_err());
        assert!(check_content_type(Some(
            "application/x-www-form-urlencoded, application/fhir+json"
        ))
        .is_err());
        assert!(check_content_type(Some("text/plain, image/png")).is_err());
        // HAPI splits at a comma inside quotes too: JSON here, XML there.
        assert!(check_content_type(Some(
            "application/fhir+json; x=\"a, application/fhir+xml;\""
        ))
        .is_err());
    }

    #[test]
    fn numeric_aliases_are_found_wherever_the_request_names_ids() {
        let ids = |method: &str, path: &str, query: Option<&str>| {
            let r = c(method, path, query).unwrap();
            numeric_alias(&r, &[]).map(str::to_string)
        };
        assert_eq!(ids("GET", "Patient/0123", None).as_deref(), Some("0123"));
        assert_eq!(ids("GET", "Patient/00", None).as_deref(), Some("00"));
        assert_eq!(
            ids("GET", "Patient/012/Observation", None).as_deref(),
            Some("012")
        );
        assert_eq!(
            ids("GET", "Observation", Some("_id=a,07")).as_deref(),
            Some("07")
        );
        for (path, query) in [
            ("Patient/0", None),
            ("Patient/123", None),
            ("Patient/0a1", None),
            ("Observation", Some("code=0123")),
        ] {
            assert_eq!(ids("GET", path, query), None, "{path} {query:?}");
        }
        let r = c("GET", "Observation", None).unwrap();
        assert_eq!(numeric_alias(&r, &["p1", "0042"]), Some("0042"));
        assert_eq!(
            numeric_alias(&r, &["\u{661}\u{662}"]),
            Some("\u{661}\u{662}")
        );
        // A Bundle's entries too.
        let b = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient/0999"}}]});
        let r = classify_bundle(c("POST", "", None).unwrap(), b.to_string().as_bytes()).unwrap();
        assert_eq!(numeric_alias(&r, &[]), Some("0999"));
    }

    #[test]
    fn bundle_entries_and_patches_are_read_in_the_shapes_servers_read() {
        let base = c("POST", "", None).unwrap();
        let entry = |e: serde_json::Value| {
            let b = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [e]});
            classify_bundle(base.clone(), b.to_string().as_bytes())
        };
        let obs = serde_json::json!({"resourceType": "Observation", "status": "final"});
        // HAPI reads a one-element array as the single value: an
        // ifNoneExist fhirwall would not see.
        assert!(entry(
            serde_json::json!({"request": {"method": "POST", "url": "Observation",
            "ifNoneExist": ["_id=x"]}, "resource": obs})
        )
        .is_err());
        assert!(entry(
            serde_json::json!({"request": {"method": "POST", "url": "Observation"},
            "resource": [obs]})
        )
        .is_err());
        assert!(
            entry(serde_json::json!({"request": [{"method": "GET", "url": "Observation"}]}))
                .is_err()
        );
        // An entry's path is run as written: a percent-encoded one would
        // name another id, or split differently, there than here.
        for url in [
            "Observation/o%31",
            "Observation%2Fo1",
            "Patient/%24everything",
        ] {
            let e = entry(serde_json::json!({"request": {"method": "DELETE", "url": url}}));
            assert!(
                e.as_ref()
                    .is_err_and(|e| e.to_string().contains("percent-encoded")),
                "{url}: {e:?}"
            );
        }
        assert!(entry(serde_json::json!({"request": {"method": "GET",
            "url": "Observation?code=a%20b"}}))
        .is_ok());
        // A server that resolves the URL (Microsoft's) removes `.` and
        // `..` segments: `Patient/.?name=x` would run as a search of
        // Patients, a DELETE of `Observation/.?code=x` as a conditional
        // delete. Refused, as at the top level; so are ids of dots alone
        // and empty segments.
        for (method, url) in [
            ("GET", "Patient/.?name=smith"),
            ("GET", "Patient/./p1"),
            ("GET", "./Patient/p1"),
            ("DELETE", "Observation/.?code=x&_count=50"),
            ("DELETE", "Observation/..."),
            ("GET", "Patient/../Observation/o1"),
            ("GET", "Patient//p1"),
        ] {
            let e = entry(serde_json::json!({"request": {"method": method, "url": url}}));
            assert!(e.is_err(), "{method} {url}: {e:?}");
        }
        assert!(!is_valid_id("."));
        assert!(!is_valid_id("..."));
        assert!(is_valid_id("a.b"));
        assert!(is_valid_id("1.2.840"));
        assert!(entry(serde_json::json!({"request": {"method": "GET",
            "url": "Observation/1.2.840"}}))
        .is_ok());
        // HAPI reads `Patient/p1/` as the id `p1/`: a write so named is
        // refused, not proved as Patient/p1; a read splits alike.
        let patient = serde_json::json!({"resourceType": "Patient", "id": "p1"});
        for (method, body) in [("PUT", Some(&patient)), ("DELETE", None)] {
            let mut e = serde_json::json!({"request": {"method": method, "url": "Patient/p1/"}});
            if let Some(b) = body {
                e["resource"] = b.clone();
            }
            let e = entry(e);
            assert!(
                e.as_ref()
                    .is_err_and(|e| e.to_string().contains("ends with '/'")),
                "{method}: {e:?}"
            );
        }
        assert!(
            entry(serde_json::json!({"request": {"method": "GET", "url": "Patient/p1/"}})).is_ok()
        );
        // HAPI reads `_include.x` as `_include` (a qualifier after '.'); a
        // servlet filter may read `_method` as the request's method.
        for query in [
            "_include.x=Observation:performer",
            "_revinclude.y=Provenance:target",
            "_method=DELETE&code=x",
        ] {
            assert!(parse_params(query).is_err(), "{query}");
        }
        assert!(parse_params("subject.name=x&_has:Observation:patient:code=y").is_ok());
        // A PATCH entry's ifMatch is a version tag, never a match URL.
        let patch = serde_json::json!({"resourceType": "Binary",
            "contentType": "application/json-patch+json", "data": "W10="});
        let patched = |tag: &str| {
            entry(
                serde_json::json!({"request": {"method": "PATCH", "url": "Observation/o1",
                "ifMatch": tag}, "resource": patch}),
            )
        };
        assert!(patched("W/\"3\"").is_ok());
        assert!(patched("\"3\"").is_ok());
        assert!(patched("Observation?subject:Patient.family=Smith").is_err());
        assert!(patched("W/3").is_err());
        // A FHIRPath Patch's parameter as one object is one parameter; a
        // name that is no string is refused.
        let op = serde_json::json!({"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Observation.performer[0].reference"},
            {"name": "value", "valueString": "Patient?identifier=urn:mrn|123"}]});
        let one = serde_json::json!({"resourceType": "Parameters", "parameter": op});
        let found = written_references(&one, true).unwrap();
        assert_eq!(found[0].resource_type.as_deref(), Some("Patient"));
        let mut odd = op.clone();
        odd["name"] = serde_json::json!(["operation"]);
        let odd = serde_json::json!({"resourceType": "Parameters", "parameter": [odd]});
        assert!(written_references(&odd, true).is_err());
        let mut odd_path = op.clone();
        odd_path["part"][1]["valueString"] =
            serde_json::json!(["Observation.performer[0].reference"]);
        let odd_path = serde_json::json!({"resourceType": "Parameters", "parameter": [odd_path]});
        assert!(written_references(&odd_path, true).is_err());
    }

    #[test]
    fn an_element_named_reference_may_hold_a_reference() {
        // Consent.provision.data.reference is a Reference object.
        let consent = serde_json::json!({"resourceType": "Consent", "provision": {"data": [
            {"meaning": "related",
             "reference": {"reference": "DocumentReference/9", "display": "HIV test"}}]}});
        assert!(written_references(&consent, false).unwrap().is_empty());
        let conditional = serde_json::json!({"resourceType": "Consent", "provision": {"data": [
            {"reference": {"reference": "DocumentReference?identifier=x"}}]}});
        let found = written_references(&conditional, false).unwrap();
        assert_eq!(found[0].resource_type.as_deref(), Some("DocumentReference"));
        // Anything else is refused, saying what it is, never what it holds.
        let odd = serde_json::json!({"resourceType": "Observation",
            "subject": {"reference": ["Patient/secret-name"]}});
        let e = written_references(&odd, false).unwrap_err().to_string();
        assert!(e.contains("an array") && !e.contains("secret-name"), "{e}");
    }

    #[test]
    fn parameters_are_counted_against_the_limit() {
        let req = |url: &str, ine: Option<&str>| {
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            classify(HttpRequest {
                method: if ine.is_some() { "POST" } else { "GET" },
                path,
                query: (!query.is_empty()).then_some(query),
                if_none_exist: ine,
            })
            .unwrap()
        };
        let three = req("Observation?a=1&b=2&c=3", None);
        assert!(three.within_parameter_limit(3).is_ok());
        assert_eq!(
            three.within_parameter_limit(2),
            Err(ClassifyError::TooManyParameters { count: 3, max: 2 })
        );
        // A conditional create's search counts too.
        let create = req("Observation", Some("identifier=x&code=y&status=z"));
        assert!(create.within_parameter_limit(2).is_err());
        // Each Bundle entry on its own.
        let top = req("", Some("")).clone();
        let bundle = |urls: &[&str]| {
            let entries: Vec<serde_json::Value> = urls
                .iter()
                .map(|u| serde_json::json!({"request": {"method": "GET", "url": u}}))
                .collect();
            let b =
                serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
            classify_bundle(top.clone(), b.to_string().as_bytes()).unwrap()
        };
        assert!(bundle(&["Observation?a=1&b=2", "Condition?c=3&d=4"])
            .within_parameter_limit(2)
            .is_ok());
        assert!(matches!(
            bundle(&["Observation?a=1", "Condition?b=1&c=3&d=4"]).within_parameter_limit(2),
            Err(ClassifyError::BadEntry { index: 1, .. })
        ));
    }
}
