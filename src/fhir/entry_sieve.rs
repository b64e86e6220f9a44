//! A Bundle read entry by entry as it arrives, for an answer larger than
//! fhirwall holds whole (pure: bytes in, bytes out).
//!
//! Why: a checked answer is held before it is judged, up to
//! `upstream.max_checked_answer_bytes`. Were the whole answer to count
//! against that cap, its size would count resources that are then left out
//! (another patient's, included by a search). Padded with the caller's own
//! data to just below the cap, whether the answer fails as too large would
//! tell whether the other patient's resource exists. Read through this
//! sieve, only what is kept counts: each element of the Bundle's top-level
//! `entry` array is held alone, judged by the caller's `keep`, and either
//! kept or let go; an element larger than what the cap leaves of what is
//! kept is let go unjudged (it could be anyone's), as are those `keep`
//! turns down. So what is held never passes the cap.
//!
//! This only finds where entries begin and end (strings, escapes and
//! nesting); it does not parse. What it keeps is parsed whole by
//! serde_json afterwards, and judged again, so a byte it mistakes can only
//! make the answer fail, never pass unjudged. Anything it cannot frame
//! (not an object, a second `entry` member, an entry that is not an object,
//! brackets that do not match, a truncated answer) is an error.

/// What becomes of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sift {
    Keep,
    /// Let go.
    Drop,
    /// Written in its place (a refusal, the entry's answer withheld).
    Replace(Vec<u8>),
    /// The whole answer fails as too large (an entry that may be neither
    /// held nor replaced).
    Fail,
}

/// Why the sieve stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SieveError {
    /// What is kept (the Bundle around its entries, and the entries kept)
    /// is larger than the cap.
    TooLarge,
    /// Not a JSON object whose `entry` can be framed; what was wrong.
    Malformed(&'static str),
}

/// Deepest nesting framed (serde_json itself stops at 128).
const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// The Bundle up to and with the `[` of its `entry` array.
    Before,
    /// Inside the `entry` array, between entries.
    Between,
    /// Inside one entry.
    Entry,
    /// From the `]` of the `entry` array to the end.
    After,
}

/// Frames the top-level `entry` array of a JSON object fed in chunks,
/// keeping the entries `keep` accepts. `keep` is given each entry's index
/// and text, or `None` for one too large to hold (see [`Sieved`]).
pub struct EntrySieve<F: FnMut(usize, Option<&[u8]>) -> Sift> {
    keep: F,
    cap: usize,
    region: Region,
    /// Open containers, `true` for an object.
    stack: Vec<bool>,
    started: bool,
    closed: bool,
    in_str: bool,
    escaped: bool,
    /// Inside the top-level object: a member name comes next.
    expect_key: bool,
    /// Capturing the top-level member name being read.
    capturing: bool,
    key: Vec<u8>,
    /// After a top-level `:`, before its value's first byte.
    awaiting_value: bool,
    /// The name before that `:` was `entry`.
    key_is_entry: bool,
    seen_entry: bool,
    /// Between entries: what may come next (`Some(true)`: an entry or `]`,
    /// just after `[`; `Some(false)`: `,` or `]`, after an entry; `None`:
    /// an entry, after a `,`).
    between: Option<bool>,
    before: Vec<u8>,
    kept: Vec<u8>,
    after: Vec<u8>,
    current: Vec<u8>,
    /// The entry being read is larger than the cap leaves: let go
    /// unjudged.
    current_over: bool,
    kept_entries: usize,
    left_out: usize,
    too_large: usize,
    /// Entries met so far.
    seen: usize,
}

/// What the sieve kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sieved {
    /// The Bundle with the kept entries only (same bytes, entries joined
    /// by `,`).
    pub body: Vec<u8>,
    /// Entries written (kept, or replaced).
    pub kept: usize,
    /// Entries `keep` turned down.
    pub left_out: usize,
    /// Entries too large for what the cap left (given to `keep` as
    /// `None`: let go, or replaced).
    pub too_large: usize,
}

impl<F: FnMut(usize, Option<&[u8]>) -> Sift> EntrySieve<F> {
    /// A sieve keeping at most `cap` bytes, entries judged by `keep`.
    pub fn new(cap: usize, keep: F) -> Self {
        EntrySieve {
            keep,
            cap,
            region: Region::Before,
            stack: Vec::new(),
            started: false,
            closed: false,
            in_str: false,
            escaped: false,
            expect_key: false,
            capturing: false,
            key: Vec::new(),
            awaiting_value: false,
            key_is_entry: false,
            seen_entry: false,
            between: Some(true),
            before: Vec::new(),
            kept: Vec::new(),
            after: Vec::new(),
            current: Vec::new(),
            current_over: false,
            kept_entries: 0,
            left_out: 0,
            too_large: 0,
            seen: 0,
        }
    }

    /// Bytes held now (what is kept and the entry being read).
    pub fn held(&self) -> usize {
        self.before.len() + self.kept.len() + self.after.len() + self.current.len()
    }

    fn kept_len(&self) -> usize {
        self.before.len() + self.kept.len() + self.after.len()
    }

    /// Adds `bytes` to the region they belong to.
    fn put(&mut self, bytes: &[u8]) -> Result<(), SieveError> {
        match self.region {
            Region::Before => self.before.extend_from_slice(bytes),
            Region::After => self.after.extend_from_slice(bytes),
            Region::Between => return Ok(()),
            Region::Entry => {
                // An entry may take what the cap leaves of what is kept
                // (and its comma): what is held never passes the cap, so
                // the memory an answer takes depends on what is kept only.
                let room = self.cap.saturating_sub(self.kept_len() + 1);
                if !self.current_over {
                    if self.current.len() + bytes.len() > room {
                        self.current_over = true;
                        self.current = Vec::new();
                    } else {
                        self.current.extend_from_slice(bytes);
                    }
                }
                return Ok(());
            }
        }
        if self.kept_len() > self.cap {
            return Err(SieveError::TooLarge);
        }
        Ok(())
    }

    fn end_entry(&mut self) -> Result<(), SieveError> {
        let entry = std::mem::take(&mut self.current);
        let index = self.seen;
        self.seen += 1;
        let sift = if self.current_over {
            self.too_large += 1;
            (self.keep)(index, None)
        } else {
            (self.keep)(index, Some(&entry))
        };
        let written = match &sift {
            Sift::Fail => return Err(SieveError::TooLarge),
            Sift::Keep if !self.current_over => Some(&entry[..]),
            Sift::Replace(with) => Some(&with[..]),
            Sift::Keep | Sift::Drop => None,
        };
        match written {
            None if self.current_over => {}
            None => self.left_out += 1,
            Some(text) => {
                if self.kept_entries > 0 {
                    self.kept.push(b',');
                }
                self.kept.extend_from_slice(text);
                self.kept_entries += 1;
                if self.kept_len() > self.cap {
                    return Err(SieveError::TooLarge);
                }
            }
        }
        self.current_over = false;
        // The buffer is reused for the next entry.
        self.current = entry;
        self.current.clear();
        Ok(())
    }

    /// Feeds the next chunk of the answer.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), SieveError> {
        let mut i = 0;
        while i < chunk.len() {
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                    self.name_byte(chunk[i]);
                    self.put(&chunk[i..=i])?;
                    i += 1;
                    continue;
                }
                let rest = &chunk[i..];
                let Some(j) = memchr::memchr2(b'"', b'\\', rest) else {
                    self.name_bytes(rest);
                    self.put(rest)?;
                    break;
                };
                self.name_bytes(&rest[..j]);
                if rest[j] == b'\\' {
                    self.escaped = true;
                    self.name_byte(b'\\');
                } else {
                    self.in_str = false;
                    self.capturing = false;
                }
                self.put(&rest[..=j])?;
                i += j + 1;
                continue;
            }
            let b = chunk[i];
            self.byte(b)?;
            i += 1;
        }
        Ok(())
    }

    fn name_bytes(&mut self, bytes: &[u8]) {
        if self.capturing {
            // Only whether it is `entry` matters: longer names stop here.
            let room = 6usize.saturating_sub(self.key.len());
            self.key.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    fn name_byte(&mut self, b: u8) {
        self.name_bytes(&[b]);
    }

    /// One byte outside any string.
    fn byte(&mut self, b: u8) -> Result<(), SieveError> {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return self.put(&[b]);
        }
        if self.closed {
            return Err(SieveError::Malformed("something follows the Bundle"));
        }
        if !self.started {
            if b != b'{' {
                return Err(SieveError::Malformed("not a JSON object"));
            }
            self.started = true;
            self.stack.push(true);
            self.expect_key = true;
            return self.put(&[b]);
        }
        let depth = self.stack.len();
        let value_start = depth == 1 && self.awaiting_value;
        if value_start {
            self.awaiting_value = false;
            if self.key_is_entry && self.seen_entry {
                return Err(SieveError::Malformed("the Bundle has two entry members"));
            }
        }
        if self.region == Region::Between {
            // Commas only between entries, exactly one.
            match (b, self.between) {
                (b',', Some(false)) => {
                    self.between = None;
                    return Ok(());
                }
                (b']', Some(_)) => {}
                (b',' | b']', _) => {
                    return Err(SieveError::Malformed(
                        "the entries are not separated by commas",
                    ))
                }
                (b'{', Some(true) | None) => {
                    // An entry begins.
                    self.region = Region::Entry;
                    self.stack.push(true);
                    return self.put(&[b]);
                }
                (b'{', Some(false)) => {
                    return Err(SieveError::Malformed(
                        "the entries are not separated by commas",
                    ))
                }
                _ => return Err(SieveError::Malformed("an entry is not an object")),
            }
        }
        match b {
            b'"' => {
                self.in_str = true;
                if depth == 1 && self.expect_key {
                    self.capturing = true;
                    self.key.clear();
                }
                self.put(&[b])
            }
            b'{' | b'[' => {
                if value_start && b == b'[' && self.key_is_entry {
                    self.seen_entry = true;
                    self.put(&[b])?;
                    self.stack.push(false);
                    self.region = Region::Between;
                    return Ok(());
                }
                if depth >= MAX_DEPTH {
                    return Err(SieveError::Malformed("nested too deep"));
                }
                self.stack.push(b == b'{');
                self.put(&[b])
            }
            b'}' | b']' => {
                let Some(object) = self.stack.pop() else {
                    return Err(SieveError::Malformed("brackets do not match"));
                };
                if object != (b == b'}') {
                    return Err(SieveError::Malformed("brackets do not match"));
                }
                match (self.region, self.stack.len()) {
                    (Region::Entry, 2) => {
                        self.put(&[b])?;
                        self.region = Region::Between;
                        self.between = Some(false);
                        self.end_entry()
                    }
                    (Region::Between, 1) => {
                        self.region = Region::After;
                        self.put(&[b])
                    }
                    (_, 0) => {
                        self.closed = true;
                        self.put(&[b])
                    }
                    _ => self.put(&[b]),
                }
            }
            b',' => {
                if depth == 1 {
                    self.expect_key = true;
                }
                self.put(&[b])
            }
            b':' => {
                if depth == 1 {
                    self.expect_key = false;
                    self.awaiting_value = true;
                    self.key_is_entry = self.key == b"entry";
                }
                self.put(&[b])
            }
            _ => self.put(&[b]),
        }
    }

    /// The answer has ended: the Bundle with the entries kept.
    pub fn finish(self) -> Result<Sieved, SieveError> {
        if !self.closed || self.in_str {
            return Err(SieveError::Malformed("the answer ends inside the Bundle"));
        }
        let mut body = self.before;
        body.extend_from_slice(&self.kept);
        body.extend_from_slice(&self.after);
        Ok(Sieved {
            body,
            kept: self.kept_entries,
            left_out: self.left_out,
            too_large: self.too_large,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Sieves `body` fed in chunks of `chunk` bytes, keeping entries
    /// without `"drop": true`.
    fn sieve(body: &[u8], cap: usize, chunk: usize) -> Result<Sieved, SieveError> {
        let mut s = EntrySieve::new(cap, |_, e: Option<&[u8]>| {
            let Some(e) = e else { return Sift::Drop };
            let e: Value = serde_json::from_slice(e).expect("an entry parses");
            if e.get("drop") == Some(&Value::Bool(true)) {
                Sift::Drop
            } else {
                Sift::Keep
            }
        });
        for c in body.chunks(chunk.max(1)) {
            s.push(c)?;
        }
        s.finish()
    }

    fn bundle() -> Value {
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "self", "url": "http://u/fhir/Observation?x=\"]}"}],
            "entry": [
                {"resource": {"resourceType": "Observation", "id": "o1", "note": [{"text": "a \\\" } ] { ["}]}},
                {"drop": true, "resource": {"resourceType": "Observation", "id": "o2", "entry": [1, 2]}},
                {"resource": {"resourceType": "Observation", "id": "o3"}, "search": {"mode": "match"}},
                {"drop": true, "resource": {"resourceType": "Patient", "id": "p2"}}
            ],
            "total": 2
        })
    }

    fn expected(mut b: Value) -> Value {
        let entries = b["entry"].as_array_mut().unwrap();
        entries.retain(|e| e.get("drop") != Some(&Value::Bool(true)));
        b
    }

    #[test]
    fn keeps_what_keep_accepts_in_any_chunking() {
        for text in [
            serde_json::to_vec(&bundle()).unwrap(),
            serde_json::to_vec_pretty(&bundle()).unwrap(),
        ] {
            for chunk in [1, 2, 3, 7, 64, 100_000] {
                let out = sieve(&text, 1 << 20, chunk).unwrap();
                let got: Value = serde_json::from_slice(&out.body).unwrap();
                assert_eq!(got, expected(bundle()), "chunk {chunk}");
                assert_eq!((out.kept, out.left_out), (2, 2));
            }
        }
    }

    #[test]
    fn an_entry_larger_than_the_cap_is_let_go_unjudged() {
        let big = "x".repeat(4000);
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"id": "a"}},
            {"resource": {"id": "b", "text": big}},
            {"resource": {"id": "c"}}
        ]});
        let text = serde_json::to_vec(&b).unwrap();
        let mut judged = Vec::new();
        let mut s = EntrySieve::new(1000, |_, e: Option<&[u8]>| match e {
            Some(e) => {
                judged.push(e.len());
                Sift::Keep
            }
            None => Sift::Drop,
        });
        for c in text.chunks(100) {
            s.push(c).unwrap();
        }
        let out = s.finish().unwrap();
        assert_eq!((out.kept, out.left_out, out.too_large), (2, 0, 1));
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(got["entry"].as_array().unwrap().len(), 2);
        assert_eq!(got["entry"][1]["resource"]["id"], "c");
        assert_eq!(judged.len(), 2, "the large entry is never judged");
    }

    /// A batch's entries keep their places: one is replaced, not let go,
    /// also when it is too large to hold; `keep` is told each index.
    #[test]
    fn entries_may_be_replaced_in_place() {
        let big = "x".repeat(4000);
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"id": "a"}},
            {"resource": {"id": "b", "text": big}},
            {"resource": {"id": "c"}}
        ]});
        let text = serde_json::to_vec(&b).unwrap();
        let mut told = Vec::new();
        let mut s = EntrySieve::new(1000, |i, e: Option<&[u8]>| {
            told.push((i, e.is_some()));
            match (i, e) {
                (_, None) => Sift::Replace(br#"{"response":{"status":"404 Not Found"}}"#.to_vec()),
                (2, Some(_)) => {
                    Sift::Replace(br#"{"response":{"status":"403 Forbidden"}}"#.to_vec())
                }
                _ => Sift::Keep,
            }
        });
        for c in text.chunks(64) {
            s.push(c).unwrap();
        }
        let out = s.finish().unwrap();
        assert_eq!(told, [(0, true), (1, false), (2, true)]);
        assert_eq!((out.kept, out.left_out, out.too_large), (3, 0, 1));
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(got["entry"][0]["resource"]["id"], "a");
        assert_eq!(got["entry"][1]["response"]["status"], "404 Not Found");
        assert_eq!(got["entry"][2]["response"]["status"], "403 Forbidden");
    }

    #[test]
    fn only_what_is_kept_counts_against_the_cap() {
        let big = "x".repeat(900);
        let b = json!({"resourceType": "Bundle", "entry": [
            {"drop": true, "resource": {"text": big}},
            {"drop": true, "resource": {"text": big}},
            {"resource": {"id": "mine"}}
        ]});
        let text = serde_json::to_vec(&b).unwrap();
        assert!(text.len() > 1000);
        let out = sieve(&text, 1000, 50).unwrap();
        assert_eq!((out.kept, out.left_out), (1, 2));
        // An entry larger than what the cap leaves of what is kept is let
        // go unjudged: what is held never passes the cap.
        let mine = json!({"resourceType": "Bundle", "entry": [{"resource": {"text": big}}, {"resource": {"text": big}}]});
        let out = sieve(&serde_json::to_vec(&mine).unwrap(), 1000, 50).unwrap();
        assert_eq!((out.kept, out.left_out, out.too_large), (1, 0, 1));
        assert!(out.body.len() <= 1000);
        // So is the Bundle around its entries.
        let around =
            json!({"resourceType": "Bundle", "meta": {"x": "y".repeat(2000)}, "entry": []});
        let err = sieve(&serde_json::to_vec(&around).unwrap(), 1000, 50).unwrap_err();
        assert_eq!(err, SieveError::TooLarge);
    }

    #[test]
    fn no_entry_array_or_an_empty_one() {
        for b in [
            json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
            json!({"resourceType": "Bundle", "entry": [], "total": 0}),
            json!({"resourceType": "Bundle", "entry": [{"drop": true}], "total": 0}),
        ] {
            let out = sieve(&serde_json::to_vec_pretty(&b).unwrap(), 1000, 3).unwrap();
            let got: Value = serde_json::from_slice(&out.body).unwrap();
            assert_eq!(got, expected_or_same(b));
        }
    }

    fn expected_or_same(b: Value) -> Value {
        if b.get("entry").is_some() {
            expected(b)
        } else {
            b
        }
    }

    #[test]
    fn names_inside_entries_or_values_are_not_the_entry_member() {
        // "entry" as a value, as a nested member and escaped: only the
        // top-level member name is framed.
        let text = br#"{"a":"entry","b":{"entry":[{"drop":true}]},"entry":[{"drop":true},{"k":1}],"c":["entry"]}"#;
        let out = sieve(text, 1000, 4).unwrap();
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(
            got,
            json!({"a":"entry","b":{"entry":[{"drop":true}]},"entry":[{"k":1}],"c":["entry"]})
        );
        // An escaped name is not framed: its entries stay (and are judged
        // whole afterwards).
        let text = br#"{"\u0065ntry":[{"drop":true}]}"#;
        let out = sieve(text, 1000, 4).unwrap();
        assert_eq!(out.body, text.to_vec());
        assert_eq!(out.left_out, 0);
    }

    #[test]
    fn what_cannot_be_framed_fails() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1]", "not a JSON object"),
            (br#"{"entry":[1]}"#, "an entry is not an object"),
            (
                br#"{"entry":[{}],"entry":[{}]}"#,
                "the Bundle has two entry members",
            ),
            (
                br#"{"entry":[{}],"entry":{}}"#,
                "the Bundle has two entry members",
            ),
            (
                br#"{"entry":[{}],"entry":1}"#,
                "the Bundle has two entry members",
            ),
            (
                br#"{"entry":[{}],"entry":"x"}"#,
                "the Bundle has two entry members",
            ),
            (br#"{"entry":[{]}"#, "brackets do not match"),
            (
                br#"{"entry":[{},]}"#,
                "the entries are not separated by commas",
            ),
            (
                br#"{"entry":[,{}]}"#,
                "the entries are not separated by commas",
            ),
            (
                br#"{"entry":[{}{}]}"#,
                "the entries are not separated by commas",
            ),
            (
                br#"{"entry":[{},,{}]}"#,
                "the entries are not separated by commas",
            ),
            (br#"{"a":1}}"#, "something follows the Bundle"),
            (br#"{"a":1} {"#, "something follows the Bundle"),
        ];
        for (text, why) in cases {
            assert_eq!(
                sieve(text, 1000, 2).unwrap_err(),
                SieveError::Malformed(why),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        for text in [
            &br#"{"entry":[{"a":"b"#[..],
            br#"{"entry":[{}]"#,
            br#"{"a":"\"#,
            b"",
        ] {
            assert_eq!(
                sieve(text, 1000, 2).unwrap_err(),
                SieveError::Malformed("the answer ends inside the Bundle")
            );
        }
    }
}
