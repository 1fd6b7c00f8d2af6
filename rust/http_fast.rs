//! The controller's `/lookup` fast path: the complete, plain `POST /lookup` requests at the start
//! of what a connection received, answered in one call (the Python binding releases the GIL).
//!
//! Requests are parsed with `httparse`. Only a request this module is sure the general HTTP
//! server (Python, llhttp) would answer with a 200 lookup is answered here; at the first request
//! it has any doubt about -- another method or path, an incomplete request, a header it does not
//! handle (`Transfer-Encoding`, `Expect`, `Upgrade`, an unusual `Connection`), a limit reached,
//! a body the lookup refuses -- it stops, and the caller hands the rest to the general server,
//! which answers exactly as it would have without this module (including every error).
//! Nothing here panics on input.
//!
//! The responses are byte for byte those of the general server: `HTTP/1.1 200 OK`,
//! `Content-Type: application/json`, `Content-Length`, and `Connection: close` when the request
//! does not keep the connection alive (HTTP/1.0 without `keep-alive`, or `Connection: close`);
//! nothing is answered after such a request.

use std::fmt::Write as _;
use std::time::Instant;

use crate::error::Result;
use crate::json::names_any;
use crate::shared::{LookupAnswer, SharedIndex};

/// Most header lines a fast-path request may have (more: the general server answers it).
pub const MAX_HEADERS: usize = 32;

/// The server's request limits; a request at or over either is left to the general server,
/// which answers 413 or 431.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line and headers (`--max-header-bytes`).
    pub max_header_bytes: usize,
    /// Body (`--max-body-bytes`).
    pub max_body_bytes: usize,
}

/// What one call answered.
#[derive(Debug, Default, PartialEq)]
pub struct Answered {
    /// The responses, in request order, ready to write.
    pub responses: Vec<u8>,
    /// Bytes of the input the answered requests took; the rest goes to the general server.
    pub consumed: usize,
    /// Seconds each answered request took (parse, lookup, response), in order; its length is
    /// the number of requests answered.
    pub seconds: Vec<f64>,
    /// The last answered request closes the connection: write the responses, then close,
    /// and read nothing more.
    pub close: bool,
    /// Answered lookups that matched something (any instance, any length).
    pub hits: u64,
    /// Tokens asked for, summed over the answered lookups.
    pub asked_tokens: u64,
    /// Tokens of each answered lookup's longest match, summed.
    pub matched_tokens: u64,
}

/// A complete request the fast path answers, before its lookup.
#[derive(Debug, PartialEq)]
pub struct LookupRequest<'a> {
    pub body: &'a [u8],
    pub detail: bool,
    pub keep_alive: bool,
    /// Bytes of the input the request takes (head and body).
    pub len: usize,
}

/// The request at the start of `data` when it is a complete `POST /lookup` the fast path
/// answers; None for anything else (see the module comment).
pub fn parse_lookup_request<'a>(data: &'a [u8], limits: &Limits) -> Option<LookupRequest<'a>> {
    // cheap refusal of everything else before parsing
    if !data.starts_with(b"POST /lookup") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    // the raw head bounds what the general server counts against --max-header-bytes
    if head_len > limits.max_header_bytes || !crlf_only(&data[..head_len]) {
        return None;
    }
    if req.method != Some("POST") {
        return None;
    }
    let detail = match req.path? {
        "/lookup" | "/lookup?detail=0" => false,
        "/lookup?detail=1" => true,
        _ => return None,
    };
    let http11 = match req.version? {
        1 => true,
        0 => false,
        _ => return None,
    };
    let mut content_length: Option<usize> = None;
    let mut connection: Option<&[u8]> = None;
    for h in req.headers.iter() {
        if !h
            .value
            .iter()
            .all(|&c| c == b'\t' || (0x20..0x7f).contains(&c))
        {
            return None;
        }
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return None;
            }
            content_length = Some(parse_length(h.value)?);
        } else if name.eq_ignore_ascii_case(b"connection")
            || name.eq_ignore_ascii_case(b"proxy-connection")
        {
            if connection.is_some() {
                return None;
            }
            connection = Some(h.value.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return None;
        }
    }
    let keep_alive = match connection {
        None => http11,
        Some(v) if v.eq_ignore_ascii_case(b"keep-alive") => true,
        Some(v) if v.eq_ignore_ascii_case(b"close") => false,
        Some(_) => return None,
    };
    let n = content_length?;
    if n > limits.max_body_bytes {
        return None;
    }
    let end = head_len.checked_add(n)?;
    let body = data.get(head_len..end)?;
    Some(LookupRequest {
        body,
        detail,
        keep_alive,
        len: end,
    })
}

/// Every line of the head ends in CRLF: no bare CR or LF (which llhttp refuses).
fn crlf_only(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &c)| match c {
        b'\n' => i > 0 && head[i - 1] == b'\r',
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

/// A Content-Length of 1 to 15 ASCII digits.
fn parse_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        v.iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')),
    )
}

/// Append the general server's 200 JSON response for `body`, with `extra` header lines (each
/// ending in CRLF) where the general server puts them.
pub fn write_response(out: &mut Vec<u8>, body: &[u8], keep_alive: bool, extra: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ");
    // writing to a Vec cannot fail
    let _ = std::io::Write::write_fmt(out, format_args!("{}", body.len()));
    out.extend_from_slice(if keep_alive {
        b"\r\n"
    } else {
        b"\r\nConnection: close\r\n"
    });
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Answer the leading fast-path requests of `data` with `lookup(body, detail, event_id)`, the
/// n-th answered request getting event id `event_prefix` + (`first_id` + n). Stops at the first
/// request that is not a fast-path one, whose body gives one of `leave_named` a value
/// (`json::names_any`: such a body is for the caller to route), or whose lookup fails (the
/// general server then answers it, error included), and after a request that closes the
/// connection. Every response gets the `extra` header lines.
pub fn answer_with(
    data: &[u8],
    limits: &Limits,
    event_prefix: &str,
    first_id: u64,
    extra: &[u8],
    leave_named: &[&str],
    mut lookup: impl FnMut(&[u8], bool, &str) -> Result<LookupAnswer>,
) -> Answered {
    let mut out = Answered::default();
    let mut event_id = String::with_capacity(event_prefix.len() + 20);
    while out.consumed < data.len() {
        let start = Instant::now();
        let Some(req) = parse_lookup_request(&data[out.consumed..], limits) else {
            break;
        };
        if names_any(req.body, leave_named) {
            break;
        }
        event_id.clear();
        event_id.push_str(event_prefix);
        let _ = write!(event_id, "{}", first_id + out.seconds.len() as u64);
        let Ok(answer) = lookup(req.body, req.detail, &event_id) else {
            break;
        };
        write_response(
            &mut out.responses,
            answer.body.as_bytes(),
            req.keep_alive,
            extra,
        );
        out.hits += u64::from(answer.matched > 0);
        out.asked_tokens += answer.asked;
        out.matched_tokens += answer.matched;
        out.consumed += req.len;
        out.seconds.push(start.elapsed().as_secs_f64());
        if !req.keep_alive {
            out.close = true;
            break;
        }
    }
    out
}

/// `answer_with` looking up in `index` (`SharedIndex::lookup_json_counted`).
pub fn answer_lookups(
    index: &SharedIndex,
    data: &[u8],
    limits: &Limits,
    event_prefix: &str,
    first_id: u64,
    extra: &[u8],
    leave_named: &[&str],
) -> Answered {
    answer_with(
        data,
        limits,
        event_prefix,
        first_id,
        extra,
        leave_named,
        |body, detail, id| index.lookup_json_counted(body, id, detail),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 16 * 1024,
        max_body_bytes: 1 << 20,
    };

    fn post(body: &str, extra: &str) -> Vec<u8> {
        format!(
            "POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A stand-in lookup: echoes the event id and the body; refuses bodies starting with 'x';
    /// "asks" the body's length and "matches" its digits.
    fn fake(body: &[u8], detail: bool, id: &str) -> Result<LookupAnswer> {
        if body.first() == Some(&b'x') {
            return Err(Error::arg("bad body"));
        }
        Ok(LookupAnswer {
            body: format!(
                "{{\"event_id\": \"{id}\", \"detail\": {detail}, \"n\": {}}}",
                body.len()
            ),
            asked: body.len() as u64,
            matched: body.iter().filter(|c| c.is_ascii_digit()).count() as u64,
        })
    }

    fn answer(data: &[u8]) -> Answered {
        answer_with(data, &LIMITS, "E-", 1, b"", &[], fake)
    }

    #[test]
    fn answers_a_plain_request_like_the_general_server() {
        let a = answer(&post("{\"tokens\": [1]}", ""));
        let body = "{\"event_id\": \"E-1\", \"detail\": false, \"n\": 15}";
        let want = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(a.responses, want.as_bytes());
        assert_eq!(a.seconds.len(), 1);
        assert!(!a.close);
    }

    #[test]
    fn pipelined_requests_until_the_first_other_one() {
        let mut data = post("{}", "");
        data.extend(post("{\"tokens\": []}", ""));
        let fast_len = data.len();
        data.extend(b"GET /metrics HTTP/1.1\r\n\r\n");
        data.extend(post("{}", ""));
        let a = answer(&data);
        assert_eq!(a.consumed, fast_len);
        assert_eq!(a.seconds.len(), 2);
        let text = String::from_utf8(a.responses).unwrap();
        assert!(text.contains("\"E-1\"") && text.contains("\"E-2\""));
    }

    #[test]
    fn detail_and_connection_close() {
        let mut data = b"POST /lookup?detail=1 HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}".to_vec();
        data.extend(post("{}", ""));
        let a = answer(&data);
        assert_eq!(a.seconds.len(), 1);
        assert!(a.close);
        let text = String::from_utf8(a.responses).unwrap();
        assert!(text.contains("\r\nConnection: close\r\n\r\n"));
        assert!(text.contains("\"detail\": true"));

        let a = answer(
            b"POST /lookup HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert!(!a.close && a.seconds.len() == 1);
        let a = answer(&post("{}", "Connection: close\r\n"));
        assert!(a.close);
    }

    #[test]
    fn leaves_everything_it_is_not_sure_of() {
        let refused: Vec<Vec<u8>> = vec![
            post("{}", "Transfer-Encoding: chunked\r\n"),
            post("{}", "Expect: 100-continue\r\n"),
            post("{}", "Upgrade: h2c\r\n"),
            post("{}", "Connection: keep-alive, Upgrade\r\n"),
            post("{}", "Connection: close\r\nConnection: close\r\n"),
            post("{}", "Content-Length: 2\r\n"),
            post("{}", "X: caf\u{e9}\r\n"),
            post("{}", "X: a\x01b\r\n"),
            b"POST /lookup HTTP/1.1\r\nContent-Length: 2\n\r\n{}".to_vec(),
            b"POST /lookup HTTP/1.1\r\n\r\n".to_vec(),
            b"POST /lookup HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}".to_vec(),
            b"POST /lookup HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}".to_vec(),
            b"POST /lookup?detail=yes HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"POST /lookups HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"POST /lookup HTTP/2.0\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"POST  /lookup HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"\r\nPOST /lookup HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"POST /lookup HTTP/1.1\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            post("x", ""),
        ];
        for data in refused {
            let a = answer(&data);
            assert_eq!(a, Answered::default(), "{}", String::from_utf8_lossy(&data));
        }
    }

    #[test]
    fn limits_are_left_to_the_general_server() {
        let data = post("{\"tokens\": [1, 2]}", "");
        let head = data.len() - 18;
        let tight = |h, b| Limits {
            max_header_bytes: h,
            max_body_bytes: b,
        };
        assert!(parse_lookup_request(&data, &tight(head, 18)).is_some());
        assert!(parse_lookup_request(&data, &tight(head - 1, 18)).is_none());
        assert!(parse_lookup_request(&data, &tight(head, 17)).is_none());
    }

    #[test]
    fn a_body_naming_a_left_field_is_left_to_the_caller() {
        let plain = post("{\"tokens\": [1, 2]}", "");
        let named = post("{\"tokens\": [1, 2], \"model\": \"m\"}", "");
        let data = [plain.clone(), named.clone(), plain.clone()].concat();
        let a = answer_with(&data, &LIMITS, "E-", 1, b"", &["model"], fake);
        assert_eq!((a.consumed, a.seconds.len()), (plain.len(), 1));
        // a null value names nothing; without names to leave, every request is answered
        let unnamed = post("{\"tokens\": [1, 2], \"model\": null}", "");
        let a = answer_with(
            &[plain.clone(), unnamed].concat(),
            &LIMITS,
            "E-",
            1,
            b"",
            &["model"],
            fake,
        );
        assert_eq!(a.seconds.len(), 2);
        assert_eq!(answer(&data).seconds.len(), 3);
    }

    #[test]
    fn answers_from_the_index() {
        let index = SharedIndex::new(4, crate::keyspace::KeySpace::Xxh3 { seed: 0 }).unwrap();
        let a = answer_lookups(
            &index,
            &post("{\"tokens\": [1, 2, 3]}", ""),
            &LIMITS,
            "L-",
            7,
            b"",
            &[],
        );
        let text = String::from_utf8(a.responses).unwrap();
        assert!(
            text.ends_with("{\"event_id\": \"L-7\", \"layout_info\": {}}"),
            "{text}"
        );
        let a = answer_lookups(
            &index,
            &post("{\"tokens\": [-1]}", ""),
            &LIMITS,
            "L-",
            7,
            b"",
            &[],
        );
        assert_eq!(a, Answered::default());
    }

    #[test]
    fn counts_what_the_answered_lookups_matched() {
        let index = SharedIndex::new(2, crate::keyspace::KeySpace::Xxh3 { seed: 0 }).unwrap();
        let keys = crate::keyspace::KeySpace::Xxh3 { seed: 0 }.keys(&[1, 2, 3, 4], 2);
        let ev = std::sync::Arc::new(crate::index::Event {
            kind: crate::index::EventKind::Admit,
            instance: "a".into(),
            worker: 0,
            location: "cpu".into(),
            start: 0,
            end: 0,
        });
        index.write(crate::index::Op::Admit(ev, keys.into()));
        // matches 4 of 5, matches 2 of 3, matches nothing of 2
        let mut data = post("{\"tokens\": [1, 2, 3, 4, 5]}", "");
        data.extend(post("{\"tokens\": [1, 2, 9]}", ""));
        data.extend(post("{\"tokens\": [7, 8]}", ""));
        let a = answer_lookups(&index, &data, &LIMITS, "L-", 1, b"", &[]);
        assert_eq!(a.seconds.len(), 3);
        assert_eq!((a.hits, a.asked_tokens, a.matched_tokens), (2, 10, 6));
    }

    fn stream(bodies: &[(u8, bool)]) -> Vec<u8> {
        let mut data = Vec::new();
        for &(n, detail) in bodies {
            let body = format!("{{\"tokens\": [{}]}}", n);
            let path = if detail {
                "/lookup?detail=1"
            } else {
                "/lookup"
            };
            data.extend(
                format!(
                    "POST {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            );
        }
        data
    }

    proptest! {
        /// A pipelined stream cut anywhere, each piece appended to what the previous call left,
        /// gives the same responses and event ids as the whole stream at once.
        #[test]
        fn random_splits_give_the_same_responses(
            bodies in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let data = stream(&bodies);
            let whole = answer(&data);
            prop_assert_eq!(whole.consumed, data.len());
            prop_assert_eq!(whole.seconds.len(), bodies.len());

            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            cuts.push(data.len());
            cuts.sort_unstable();
            let (mut pending, mut responses, mut next_id, mut from) = (Vec::new(), Vec::new(), 1, 0);
            for cut in cuts {
                pending.extend_from_slice(&data[from..cut]);
                from = cut;
                let a = answer_with(&pending, &LIMITS, "E-", next_id, b"", &[], fake);
                responses.extend(a.responses);
                next_id += a.seconds.len() as u64;
                pending.drain(..a.consumed);
            }
            prop_assert!(pending.is_empty());
            prop_assert_eq!(responses, whole.responses);
        }

        /// Arbitrary bytes never panic, and what is answered is a prefix of the input.
        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut input = b"POST /lookup HTTP/1.1\r\n".to_vec();
            input.extend(&data);
            let a = answer(&input);
            prop_assert!(a.consumed <= input.len());
            let a = answer(&data);
            prop_assert!(a.consumed <= data.len());
        }
    }
}
