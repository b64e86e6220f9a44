//! JSON from a client, read the way fhirwall decides on it: with
//! `serde_json`, but refusing an object that names a key twice.
//!
//! `serde_json::Value` keeps the last of two equal keys; servers differ
//! (some keep the first, some refuse). A request body fhirwall decides on
//! (a Bundle's entries, a written resource's references) must mean one
//! thing to fhirwall and to the server, so duplicates are refused.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `body` as JSON; an object with a repeated key is an error naming
/// the key.
pub fn parse(body: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(body).map(|s| s.0)
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the key '{key}' appears twice in one object"
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use serde_json::json;

    #[test]
    fn parses_what_serde_json_parses() {
        let doc = br#"{"a": [1, -2, 3.5, "x\u003f", true, null, {"b": {}}], "c": "d"}"#;
        assert_eq!(
            parse(doc).unwrap(),
            serde_json::from_slice::<serde_json::Value>(doc).unwrap()
        );
        assert_eq!(parse(b"[]").unwrap(), json!([]));
    }

    #[test]
    fn refuses_a_repeated_key_at_any_depth_and_what_is_not_json() {
        for (doc, says) in [
            (
                &br#"{"reference": "Patient?x=1", "reference": "Patient/1"}"#[..],
                "'reference' appears twice",
            ),
            (
                br#"{"entry": [{"request": {"url": "a", "url": "b"}}]}"#,
                "'url' appears twice",
            ),
            // Equal after unescaping is equal.
            (br#"{"id": "1", "i\u0064": "2"}"#, "'id' appears twice"),
            (br#"{"a": 1,}"#, "trailing comma"),
            (br#"{"a": NaN}"#, "expected value"),
        ] {
            let e = parse(doc).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        // Nesting deeper than serde_json's limit is refused, not a crash.
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
