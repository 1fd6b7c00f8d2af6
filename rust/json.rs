//! The controller's /lookup hot path: parse the request body and render the response, in Rust.

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};
use crate::index::{DetailedMatch, Match};

/// Parse `{"tokens": [u32, ...], ...}` (other keys ignored).
pub fn parse_lookup_body(body: &[u8]) -> Result<Vec<u32>> {
    if let Some(tokens) = fast_tokens(body) {
        return Ok(tokens);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let tokens = de
        .deserialize_any(BodyVisitor)
        .and_then(|t| de.end().map(|_| t))
        .map_err(|e| Error::arg(format!("bad /lookup body: {e}")))?;
    tokens.ok_or_else(|| Error::arg("bad /lookup body: missing \"tokens\""))
}

/// The common body exactly: `{"tokens": [d, d, ...]}` with plain non-negative integers and any
/// whitespace. Anything else (other keys, escapes, signs, fractions, out-of-range values) returns
/// None and goes through the full parser, which also produces the error messages.
fn fast_tokens(b: &[u8]) -> Option<Vec<u32>> {
    #[inline]
    fn ws(b: &[u8], mut i: usize) -> usize {
        while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
            i += 1;
        }
        i
    }
    let mut i = ws(b, 0);
    for expect in [&b"{"[..], b"\"tokens\"", b":", b"["] {
        if !b[i..].starts_with(expect) {
            return None;
        }
        i = ws(b, i + expect.len());
    }
    let mut out = Vec::with_capacity(b.len() / 4);
    if b.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let start = i;
            let mut v: u64 = 0;
            while i < b.len() && b[i].is_ascii_digit() && i - start < 11 {
                v = v * 10 + (b[i] - b'0') as u64;
                i += 1;
            }
            let digits = i - start;
            if digits == 0 || digits > 10 || (digits > 1 && b[start] == b'0') || v > u32::MAX as u64
            {
                return None;
            }
            out.push(v as u32);
            i = ws(b, i);
            match b.get(i) {
                Some(b',') => i = ws(b, i + 1),
                Some(b']') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    i = ws(b, i);
    if b.get(i) != Some(&b'}') {
        return None;
    }
    (ws(b, i + 1) == b.len()).then_some(out)
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Option<Vec<u32>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with a \"tokens\" list")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut tokens = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "tokens" {
                if tokens.is_some() {
                    return Err(de::Error::custom("duplicate key \"tokens\""));
                }
                tokens = Some(map.next_value_seed(TokensSeed)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(tokens)
    }
}

struct TokensSeed;

impl<'de> DeserializeSeed<'de> for TokensSeed {
    type Value = Vec<u32>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u32>, D::Error> {
        d.deserialize_any(TokensVisitor)
    }
}

struct TokensVisitor;

impl<'de> Visitor<'de> for TokensVisitor {
    type Value = Vec<u32>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"tokens\" to be a list of integers in 0..=4294967295")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(t) = seq.next_element_seed(TokenSeed(out.len()))? {
            out.push(t);
        }
        Ok(out)
    }
}

struct TokenSeed(usize);

impl<'de> DeserializeSeed<'de> for TokenSeed {
    type Value = u32;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        d.deserialize_any(self)
    }
}

impl TokenSeed {
    fn bad<E: de::Error>(&self, what: impl fmt::Display) -> E {
        E::custom(format!(
            "tokens[{}] must be an integer in 0..=4294967295, got {what}",
            self.0
        ))
    }
}

impl<'de> Visitor<'de> for TokenSeed {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokens[{}] to be an integer in 0..=4294967295", self.0)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| self.bad(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| self.bad(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
        Err(self.bad(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<u32, E> {
        Err(self.bad(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
        Err(self.bad(format_args!("a string {v:?}")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<u32, E> {
        Err(self.bad("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<u32, A::Error> {
        Err(self.bad("a list"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<u32, A::Error> {
        Err(self.bad("an object"))
    }
}

/// Append `s` as a JSON string (ASCII-only output, like Python's json.dumps).
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_pair(out: &mut String, loc: &str, n: u64) {
    out.push('[');
    write_str(out, loc);
    let _ = write!(out, ", {n}]");
}

/// `{"event_id": ..., "layout_info": {inst: [loc, n]}, inst: [loc, n], ...}` plus
/// `"detail": {...}` when given.
pub fn render_lookup(
    event_id: &str,
    matches: &[Match],
    detail: Option<&[DetailedMatch]>,
) -> String {
    let mut out = String::with_capacity(64 + matches.len() * 64);
    out.push_str("{\"event_id\": ");
    write_str(&mut out, event_id);
    out.push_str(", \"layout_info\": {");
    for (i, m) in matches.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_str(&mut out, &m.instance);
        out.push_str(": ");
        write_pair(&mut out, &m.location, m.length);
    }
    out.push('}');
    for m in matches {
        out.push_str(", ");
        write_str(&mut out, &m.instance);
        out.push_str(": ");
        write_pair(&mut out, &m.location, m.length);
    }
    if let Some(detail) = detail {
        out.push_str(", \"detail\": {");
        for (i, d) in detail.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write_str(&mut out, &d.instance);
            out.push_str(": {\"location\": ");
            match &d.best {
                Some((loc, _)) => write_str(&mut out, loc),
                None => out.push_str("null"),
            }
            let _ = write!(
                out,
                ", \"matched_prefix_length\": {}, \"locations\": {{",
                d.best.as_ref().map_or(0, |b| b.1)
            );
            for (j, (loc, n)) in d.locations.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                write_str(&mut out, loc);
                let _ = write!(out, ": {n}");
            }
            out.push_str("}, \"workers\": {");
            for (j, (w, locs)) in d.workers.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "\"{w}\": {{");
                for (k, (loc, n)) in locs.iter().enumerate() {
                    if k > 0 {
                        out.push_str(", ");
                    }
                    write_str(&mut out, loc);
                    let _ = write!(out, ": {n}");
                }
                out.push('}');
            }
            out.push_str("}}");
        }
        out.push('}');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(
            parse_lookup_body(br#"{"tokens": [1, 2, 4294967295]}"#).unwrap(),
            vec![1, 2, u32::MAX]
        );
        assert_eq!(
            parse_lookup_body(br#"{"x": {"a": [1, "b"]}, "tokens": [], "y": null}"#).unwrap(),
            Vec::<u32>::new()
        );
        for bad in [
            &br#"{"tokens": [-1]}"#[..],
            br#"{"tokens": [4294967296]}"#,
            br#"{"tokens": [1.5]}"#,
            br#"{"tokens": ["1"]}"#,
            br#"{"tokens": 3}"#,
            br#"{"tokens": [1], "tokens": [2]}"#,
            br#"{}"#,
            br#"[1, 2]"#,
            br#"{"tokens": [1]} x"#,
            b"",
            b"\xff",
        ] {
            let e = parse_lookup_body(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        let e = parse_lookup_body(br#"{"tokens": [0, -1]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens[1]"), "{e}");
    }

    #[test]
    fn fast_path_agrees_with_full_parser() {
        for body in [
            &b"{\"tokens\": [1, 2, 3]}"[..],
            b" {\n\"tokens\" :[ 0 ,4294967295 ] } ",
            b"{\"tokens\": []}",
            b"{\"tokens\": [01]}",
            b"{\"tokens\": [4294967296]}",
            b"{\"tokens\": [1.0]}",
            b"{\"tokens\": [1e2]}",
            b"{\"tokens\": [-0]}",
            b"{\"tokens\": [1,]}",
            b"{\"tokens\": [1] }x",
            b"{\"tokens\": [99999999999]}",
        ] {
            let mut de = serde_json::Deserializer::from_slice(body);
            let full = de
                .deserialize_any(BodyVisitor)
                .and_then(|t| de.end().map(|_| t));
            match fast_tokens(body) {
                Some(t) => assert_eq!(Some(t), full.unwrap(), "{}", String::from_utf8_lossy(body)),
                None => {
                    // either the full parser rejects it, or it is a shape the fast path skips
                    let _ = full;
                }
            }
        }
        assert_eq!(fast_tokens(b"{\"tokens\": [1, 2, 3]}"), Some(vec![1, 2, 3]));
        assert_eq!(fast_tokens(b"{\"tokens\": [01]}"), None);
        assert_eq!(fast_tokens(b"{\"tokens\": [4294967296]}"), None);
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\n\u{1}é😀");
        assert_eq!(s, r#""a\"b\\c\n\u0001\u00e9\ud83d\ude00""#);
    }
}
