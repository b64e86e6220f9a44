//! Edits to a JSON document that leave everything else byte for byte:
//! a Bundle fhirwall changes (an entry's `request.ifMatch` or narrowed
//! `url`, an answer's paging links, a withheld entry) keeps its numbers as
//! they were written. (Parsed into a `serde_json::Value` and written back,
//! `5.10` would become `5.1`, and FHIR holds a decimal's precision
//! significant.)
//!
//! Values are found by parsing with borrowed [`RawValue`]s, whose text lies
//! inside the document; an edit replaces such a span.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;

/// A document and the edits to make to it.
pub struct JsonEdit<'a> {
    text: &'a str,
    /// (start, end, replacement), non-overlapping.
    edits: Vec<(usize, usize, String)>,
}

/// An object's members by name (the last of a repeated name).
pub fn members(raw: &RawValue) -> Option<HashMap<Cow<'_, str>, &RawValue>> {
    serde_json::from_str(raw.get()).ok()
}

/// An array's elements.
pub fn elements(raw: &RawValue) -> Option<Vec<&RawValue>> {
    serde_json::from_str(raw.get()).ok()
}

/// An object's member `name`.
pub fn member<'a>(raw: &'a RawValue, name: &str) -> Option<&'a RawValue> {
    members(raw)?.get(name).copied()
}

/// The entries of a Bundle's text, borrowed from it.
pub fn bundle_entries(text: &str) -> Option<Vec<&RawValue>> {
    elements(parse(text)?.get("entry")?)
}

/// The document's top-level members, borrowed from `text`.
pub fn parse(text: &str) -> Option<HashMap<Cow<'_, str>, &RawValue>> {
    serde_json::from_str(text).ok()
}

/// `s` as a JSON string.
pub fn string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl<'a> JsonEdit<'a> {
    pub fn new(text: &'a str) -> JsonEdit<'a> {
        JsonEdit {
            text,
            edits: Vec::new(),
        }
    }

    /// Where `raw` lies in the document (it must have been parsed from it).
    fn span(&self, raw: &RawValue) -> Option<(usize, usize)> {
        let base = self.text.as_ptr() as usize;
        let start = (raw.get().as_ptr() as usize).checked_sub(base)?;
        let end = start + raw.get().len();
        (end <= self.text.len()).then_some((start, end))
    }

    /// Replaces the value `raw` with `json`.
    pub fn replace(&mut self, raw: &RawValue, json: String) -> Option<()> {
        let (start, end) = self.span(raw)?;
        self.edits.push((start, end, json));
        Some(())
    }

    /// Adds the member `key: json` first in the object `object` (which
    /// must not have one of that name).
    pub fn insert_first(&mut self, object: &RawValue, key: &str, json: &str) -> Option<()> {
        let (start, _) = self.span(object)?;
        if !self.text[start..].starts_with('{') {
            return None;
        }
        let empty = members(object)?.is_empty();
        let member = format!("{}:{json}{}", string(key), if empty { "" } else { "," });
        self.edits.push((start + 1, start + 1, member));
        Some(())
    }

    /// Removes the member `key` (a name without escapes) whose value is
    /// `value`, with one comma beside it.
    pub fn remove_member(&mut self, key: &str, value: &RawValue) -> Option<()> {
        let (vstart, vend) = self.span(value)?;
        let t = self.text;
        let before = t[..vstart].trim_end().strip_suffix(':')?.trim_end();
        let key_start = before.strip_suffix(&format!("\"{key}\""))?.len();
        let ahead = t[..key_start].trim_end();
        if let Some(rest) = ahead.strip_suffix(',') {
            // `…, "key": value` → `…`
            self.edits.push((rest.len(), vend, String::new()));
        } else if ahead.ends_with('{') {
            // `{"key": value, …` → `{…`
            let after = &t[vend..];
            let skip = after.len() - after.trim_start().len();
            let end = match after.trim_start().strip_prefix(',') {
                Some(_) => vend + skip + 1,
                None => vend,
            };
            self.edits.push((key_start, end, String::new()));
        } else {
            return None;
        }
        Some(())
    }

    /// Whether any edit was made.
    pub fn changed(&self) -> bool {
        !self.edits.is_empty()
    }

    /// The edited document; `None` if edits overlap.
    pub fn finish(mut self) -> Option<String> {
        self.edits.sort_by_key(|e| (e.0, e.1));
        let mut out = String::with_capacity(self.text.len() + 64);
        let mut at = 0;
        for (start, end, with) in &self.edits {
            if *start < at {
                return None;
            }
            out.push_str(&self.text[at..*start]);
            out.push_str(with);
            at = *end;
        }
        out.push_str(&self.text[at..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"resourceType":"Bundle", "total": 3 ,"entry":[
        {"resource":{"resourceType":"Observation","valueQuantity":{"value":5.10},"big":12345678901234567890123},
         "request":{"method":"PUT","url":"Observation/o1"}},
        {"request":{}}]}"#;

    #[test]
    fn edits_leave_everything_else_as_written() {
        let top = parse(DOC).unwrap();
        let entries = elements(top["entry"]).unwrap();
        let mut e = JsonEdit::new(DOC);
        let first = members(entries[0]).unwrap();
        let req = members(first["request"]).unwrap();
        e.replace(req["url"], string("Observation/o1?patient=p1"))
            .unwrap();
        e.insert_first(first["request"], "ifMatch", &string("W/\"2\""))
            .unwrap();
        let second = members(entries[1]).unwrap();
        e.insert_first(second["request"], "ifMatch", &string("W/\"7\""))
            .unwrap();
        e.remove_member("total", top["total"]).unwrap();
        assert!(e.changed());
        let out = e.finish().unwrap();
        assert!(out.contains(r#""value":5.10}"#), "{out}");
        assert!(out.contains("12345678901234567890123"), "{out}");
        assert!(!out.contains("total"), "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["entry"][0]["request"]["url"], "Observation/o1?patient=p1");
        assert_eq!(v["entry"][0]["request"]["ifMatch"], "W/\"2\"");
        assert_eq!(v["entry"][0]["request"]["method"], "PUT");
        assert_eq!(v["entry"][1]["request"]["ifMatch"], "W/\"7\"");
        assert_eq!(v["resourceType"], "Bundle");
    }

    #[test]
    fn a_member_is_removed_first_last_or_alone() {
        for (doc, want) in [
            (r#"{"total":1,"a":2}"#, r#"{"a":2}"#),
            (r#"{"a":2, "total" : 1 }"#, r#"{"a":2 }"#),
            (r#"{ "total":1 }"#, r#"{  }"#),
        ] {
            let top = parse(doc).unwrap();
            let mut e = JsonEdit::new(doc);
            e.remove_member("total", top["total"]).unwrap();
            let out = e.finish().unwrap();
            assert_eq!(out, want);
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
    }

    #[test]
    fn overlapping_edits_are_refused() {
        let doc = r#"{"a":{"b":1}}"#;
        let top = parse(doc).unwrap();
        let inner = members(top["a"]).unwrap();
        let mut e = JsonEdit::new(doc);
        e.replace(top["a"], "2".into()).unwrap();
        e.replace(inner["b"], "3".into()).unwrap();
        assert!(e.finish().is_none());
    }
}
