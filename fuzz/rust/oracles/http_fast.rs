// The controller's /lookup fast path (`http_fast::answer_with`) on any bytes.
//
// * no panic, `consumed` within the input and on request boundaries;
// * the responses are exactly one well-formed `200` per answered request, each carrying the
//   body the lookup returned for that request's body, `Connection: close` only on the last and
//   only when the call says it closes;
// * the counts (lookups with a match, tokens asked, tokens matched) are the answered lookups' sums;
// * it stops only where it must: after the last answered request, the rest of the input is not
//   a fast-path request whose lookup succeeds and whose body names no field it was told to
//   leave (unless the connection was closed); no answered body names one (`names_any`).
//
// The first input byte picks the limits (small ones reach the "leave it to the general server"
// branches with short inputs), the extra header and whether the namespace fields are left.

use _core::http_fast::{answer_with, parse_lookup_request, Limits};
use _core::json::{names_any, parse_lookup_body};
use _core::shared::LookupAnswer;

/// A stand-in lookup that "matches" half the tokens it is asked.
fn lookup(body: &[u8], detail: bool, id: &str) -> _core::error::Result<LookupAnswer> {
    let tokens = parse_lookup_body(body)?;
    Ok(LookupAnswer {
        body: format!(
            "{{\"id\":\"{id}\",\"n\":{},\"d\":{detail}}}",
            tokens.len()
        ),
        asked: tokens.len() as u64,
        matched: tokens.len() as u64 / 2,
    })
}

/// One input through the target's checks; panics on a finding.
pub fn check(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let limits = if data[0] & 1 == 1 {
        Limits {
            max_header_bytes: 64,
            max_body_bytes: 16,
        }
    } else {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1 << 20,
        }
    };
    let input = &data[1..];
    let extra: &[u8] = if data[0] & 4 == 4 {
        b"X-Lmc-Seq: 7\r\n"
    } else {
        b""
    };
    let leave: &[&str] = if data[0] & 8 == 8 {
        &["model", "lora_name", "cache_salt"]
    } else {
        &[]
    };
    let out = answer_with(input, &limits, "E-", 1, extra, leave, lookup);
    assert!(out.consumed <= input.len());
    // replay the requests it answered, one by one, and rebuild the responses it must have written
    let mut pos = 0;
    let mut expected = Vec::new();
    let (mut hits, mut asked, mut matched) = (0, 0, 0);
    for n in 0..out.seconds.len() {
        let req = parse_lookup_request(&input[pos..], &limits)
            .expect("answered a request it does not parse");
        assert!(!names_any(req.body, leave), "answered a body naming a field to leave");
        let body = lookup(req.body, req.detail, &format!("E-{}", 1 + n))
            .expect("answered a failing lookup");
        _core::http_fast::write_response(&mut expected, body.body.as_bytes(), req.keep_alive, extra);
        hits += u64::from(body.matched > 0);
        asked += body.asked;
        matched += body.matched;
        pos += req.len;
        assert!(
            req.keep_alive || n + 1 == out.seconds.len(),
            "kept answering after a closing request"
        );
        if n + 1 == out.seconds.len() {
            assert_eq!(out.close, !req.keep_alive);
        }
    }
    assert_eq!(
        (hits, asked, matched),
        (out.hits, out.asked_tokens, out.matched_tokens),
        "counts are not the answered lookups' sums"
    );
    assert_eq!(
        pos, out.consumed,
        "consumed is not the answered requests' length"
    );
    assert!(
        expected == out.responses,
        "responses differ from one 200 per answered request"
    );
    if !out.close {
        if let Some(next) = parse_lookup_request(&input[pos..], &limits) {
            assert!(
                lookup(next.body, next.detail, "x").is_err() || names_any(next.body, leave),
                "stopped before a request it answers"
            );
        }
    }
}
