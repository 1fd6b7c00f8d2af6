// The /lookup body parser and the response writer, on any bytes.
//
// * `parse_lookup_body` returns tokens or an error, never panics;
// * when it returns tokens, serde_json's own reading of the body agrees: an object whose
//   single "tokens" key is a list of integers in u32 range, each spelled as plain digits or
//   `-0` (read as 0), equal to what was returned;
// * `parse_lookup_tokens` (which reads the numbers only as they are taken) accepts and refuses
//   what `parse_lookup_body` does, with the same tokens, taken whole or a few at a time;
// * the response rendered for any event id and instance/location names read from the
//   input is valid JSON and gives those strings back;
// * `names_any`'s skim of a JSON body, wherever it answers, answers as the full parse
//   (for names with and without "tokens").

use _core::index::Match;
use _core::hash::TokenCursor;
use _core::json::{names_any_parsed, names_any_skimmed, parse_lookup_body, parse_lookup_tokens, render_lookup};
use serde_json::value::RawValue;
use serde_json::Value;

/// One input through the target's checks; panics on a finding.
pub fn check(data: &[u8]) {
    if serde_json::from_slice::<&RawValue>(data).is_ok() {
        for names in [&["model", "lora_name", "cache_salt"][..], &["x", "tokens"][..]] {
            if let Some(found) = names_any_skimmed(data, names) {
                assert_eq!(found, names_any_parsed(data, names), "names_any's skim and parse disagree");
            }
        }
    }
    let eager = parse_lookup_body(data).ok();
    let whole = parse_lookup_tokens(data).ok().map(|t| t.into_vec());
    assert_eq!(whole, eager, "parse_lookup_tokens and parse_lookup_body disagree");
    if let Ok(mut lazy) = parse_lookup_tokens(data) {
        let mut taken = Vec::new();
        while lazy.remaining() > 0 {
            let n = lazy.remaining().min(3);
            taken.extend_from_slice(lazy.take(n));
        }
        assert_eq!(Some(taken), eager, "tokens taken 3 at a time differ");
    }
    if let Ok(tokens) = parse_lookup_body(data) {
        // serde_json::Value keeps the last of duplicate keys; the parser refuses duplicate
        // "tokens", so the two agree whenever the parser accepts.
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) {
            assert!(
                map.get("tokens").is_some_and(Value::is_array),
                "accepted without a tokens list"
            );
            // each element's own text: serde_json::Value reads -0 as the float -0.0 and could
            // not tell it from -0.0, which must be refused
            let raw: std::collections::BTreeMap<String, &RawValue> =
                serde_json::from_slice(data).expect("Value read it, so this reads it");
            let elements: Vec<&RawValue> =
                serde_json::from_str(raw["tokens"].get()).expect("a list");
            let theirs: Vec<u32> = elements
                .iter()
                .map(|e| match e.get() {
                    "-0" => 0,
                    t => {
                        assert!(
                            t.bytes().all(|c| c.is_ascii_digit()),
                            "accepted the token {t}"
                        );
                        t.parse().expect("accepted a token out of u32 range")
                    }
                })
                .collect();
            assert_eq!(theirs, tokens, "parser and serde_json disagree");
        }
    }
    // Names from the input (lossy UTF-8: any Rust string) through the writer.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{1}');
    let event_id = parts.next().unwrap_or("").to_string();
    let instance = parts.next().unwrap_or("inst").to_string();
    let location = parts.next().unwrap_or("GPU").to_string();
    if instance == "event_id" || instance == "layout_info" {
        return; // reserved: the index refuses these instance ids
    }
    let matches = vec![Match {
        instance: instance.clone().into(),
        location: location.clone().into(),
        length: 7,
    }];
    let out = render_lookup(&event_id, &matches, None);
    let v: Value = serde_json::from_str(&out).expect("render_lookup wrote invalid JSON");
    assert_eq!(v["event_id"].as_str(), Some(event_id.as_str()));
    assert_eq!(
        v["layout_info"][&instance][0].as_str(),
        Some(location.as_str())
    );
    assert_eq!(v["layout_info"][&instance][1].as_u64(), Some(7));
}
