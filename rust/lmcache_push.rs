//! LMCache workers' pull-socket frames (msgpack), read without Python objects: the common
//! shape, a `BatchedKVOperationMsg` of admits and evicts, grouped per holder.
//!
//! Only that shape is taken: a map of exactly `type` ("BatchedKVOperationMsg", at any
//! position, as msgspec reads the tag), `instance_id` and `location` (str, valid UTF-8, at most
//! MAX_NAME_BYTES, the location not empty), `worker_id` (int) and `operations`: at least one
//! map of exactly `op_type` ("admit" | "evict"), `key` and `seq_num` (ints). Anything else
//! (other messages, unknown or repeated fields, JSON, an empty batch, malformed or trailing
//! bytes) gives `None`: the caller decodes that frame with msgspec as before, which counts and
//! logs what it refuses. So a frame taken here is one msgspec decodes to the same message.
//!
//! A key is the index's 64-bit word of the int: its value mod 2^64, as the index takes a
//! Python int (a signed key and its unsigned twin are one key).

use std::collections::HashMap;

use rmp::Marker;

use crate::msgpack_read::{int, len_of, marker, str_after, Skip, R};

/// Longest instance id or location taken here (longer ones go to the Python decoder).
pub const MAX_NAME_BYTES: usize = 1024;

const TAG: &[u8] = b"BatchedKVOperationMsg";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Admit,
    Evict,
}

/// A frame's message without its operations (those go to the caller's buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct Frame<'a> {
    pub instance_id: &'a str,
    pub worker_id: i128,
    pub location: &'a str,
    /// `seq_num` of the first and the last operation (the seq check reads only these).
    pub first_seq: i128,
    pub last_seq: i128,
}

fn map_len(rd: &mut &[u8]) -> R<usize> {
    let m = marker(rd)?;
    match m {
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => len_of(rd, m),
        _ => Err(Skip),
    }
}

fn name<'a>(rd: &mut &'a [u8]) -> R<&'a str> {
    let m = marker(rd)?;
    let s = str_after(rd, m)?;
    if s.len() > MAX_NAME_BYTES {
        return Err(Skip);
    }
    std::str::from_utf8(s).map_err(|_| Skip)
}

fn field<'a>(rd: &mut &'a [u8]) -> R<&'a [u8]> {
    let m = marker(rd)?;
    str_after(rd, m)
}

/// The usual op as LMCache encodes it, up to the key: {"op_type": "admit" | "evict", "key": ...
const ADMIT_HEAD: &[u8] = b"\x83\xa7op_type\xa5admit\xa3key";
const EVICT_HEAD: &[u8] = b"\x83\xa7op_type\xa5evict\xa3key";
const SEQ_FIELD: &[u8] = b"\xa7seq_num";
const _: () = assert!(ADMIT_HEAD.len() == EVICT_HEAD.len());

/// An int in the encodings msgpack writers use for 64-bit values, read without rmp's generic
/// reader (the hot loop); `None`: another encoding (or not an int), for the generic reader.
#[inline]
fn quick_int(rd: &mut &[u8]) -> Option<i128> {
    let (&m, rest) = rd.split_first()?;
    let (v, n) = match m {
        0x00..=0x7f => (m as i128, 0),
        0xe0..=0xff => (m as i8 as i128, 0),
        0xcc => (*rest.first()? as i128, 1),
        0xcd => (
            u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as i128,
            2,
        ),
        0xce => (
            u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as i128,
            4,
        ),
        0xcf => (
            u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) as i128,
            8,
        ),
        0xd3 => (
            i64::from_be_bytes(rest.get(..8)?.try_into().ok()?) as i128,
            8,
        ),
        _ => return None,
    };
    *rd = &rest[n..];
    Some(v)
}

#[inline]
fn any_int(rd: &mut &[u8]) -> R<i128> {
    match quick_int(rd) {
        Some(v) => Ok(v),
        None => int(rd),
    }
}

/// One operation: (kind, key, seq_num).
fn op(rd: &mut &[u8]) -> R<(OpKind, u64, i128)> {
    // the encoding every LMCache worker sends, without a field-name lookup
    let kind = if rd.starts_with(ADMIT_HEAD) {
        Some(OpKind::Admit)
    } else if rd.starts_with(EVICT_HEAD) {
        Some(OpKind::Evict)
    } else {
        None
    };
    if let Some(kind) = kind {
        *rd = &rd[ADMIT_HEAD.len()..];
        let key = any_int(rd)? as u64; // mod 2^64
        *rd = rd.strip_prefix(SEQ_FIELD).ok_or(Skip)?;
        return Ok((kind, key, any_int(rd)?));
    }
    if map_len(rd)? != 3 {
        return Err(Skip);
    }
    let (mut kind, mut key, mut seq) = (None, None, None);
    for _ in 0..3 {
        match field(rd)? {
            b"op_type" if kind.is_none() => {
                kind = Some(match field(rd)? {
                    b"admit" => OpKind::Admit,
                    b"evict" => OpKind::Evict,
                    _ => return Err(Skip),
                })
            }
            b"key" if key.is_none() => key = Some(int(rd)? as u64),
            b"seq_num" if seq.is_none() => seq = Some(int(rd)?),
            _ => return Err(Skip), // unknown or repeated
        }
    }
    // three fields, none repeated: all present
    Ok((kind.ok_or(Skip)?, key.ok_or(Skip)?, seq.ok_or(Skip)?))
}

fn message<'a>(mut rd: &'a [u8], ops: &mut Vec<(OpKind, u64)>) -> R<Frame<'a>> {
    let rd = &mut rd;
    if map_len(rd)? != 5 {
        return Err(Skip);
    }
    let (mut tag, mut instance_id, mut worker_id, mut location) = (false, None, None, None);
    let mut seqs = None;
    for _ in 0..5 {
        match field(rd)? {
            b"type" if !tag => {
                if field(rd)? != TAG {
                    return Err(Skip);
                }
                tag = true;
            }
            b"instance_id" if instance_id.is_none() => instance_id = Some(name(rd)?),
            b"worker_id" if worker_id.is_none() => worker_id = Some(int(rd)?),
            b"location" if location.is_none() => location = Some(name(rd)?),
            b"operations" if seqs.is_none() => {
                let m = marker(rd)?;
                if !matches!(m, Marker::FixArray(_) | Marker::Array16 | Marker::Array32) {
                    return Err(Skip);
                }
                let n = len_of(rd, m)?;
                // an op takes 4 bytes at least: a bogus length stops here, before any allocation
                if n == 0 || n > rd.len() / 4 {
                    return Err(Skip);
                }
                ops.reserve(n);
                let mut first = 0;
                let mut last = 0;
                for i in 0..n {
                    let (kind, key, seq) = op(rd)?;
                    if i == 0 {
                        first = seq;
                    }
                    last = seq;
                    ops.push((kind, key));
                }
                seqs = Some((first, last));
            }
            _ => return Err(Skip), // unknown or repeated
        }
    }
    let location = location.ok_or(Skip)?;
    let (first_seq, last_seq) = seqs.ok_or(Skip)?;
    if !tag || location.is_empty() || !rd.is_empty() {
        return Err(Skip); // no tag, no location (counted by the Python path), trailing bytes
    }
    Ok(Frame {
        instance_id: instance_id.ok_or(Skip)?,
        worker_id: worker_id.ok_or(Skip)?,
        location,
        first_seq,
        last_seq,
    })
}

/// The frame's message when it has the common shape, its operations appended to `ops`;
/// `None` (and `ops` as it was) otherwise.
pub fn parse<'a>(frame: &'a [u8], ops: &mut Vec<(OpKind, u64)>) -> Option<Frame<'a>> {
    let before = ops.len();
    let parsed = message(frame, ops).ok();
    if parsed.is_none() {
        ops.truncate(before);
    }
    parsed
}

/// Keys of one kind in arrival order.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub kind: OpKind,
    pub keys: Vec<u64>,
}

/// One holder's (instance, worker, location) messages within a segment.
#[derive(Clone, Debug, PartialEq)]
pub struct Holder<'a> {
    pub instance_id: &'a str,
    pub worker_id: i128,
    pub location: &'a str,
    pub frames: usize,
    /// `seq_num` of its first message's first operation and of its last message's last one.
    pub first_seq: i128,
    pub last_seq: i128,
    /// Sequence jumps between its messages here: (expected, got), in order.
    pub gaps: Vec<(i128, i128)>,
    pub runs: Vec<Run>,
}

/// Consecutive frames `start..end` of one read, all taken here, grouped per holder (in the
/// order holders first appear). Holders are independent of each other, so this keeps every
/// order that matters: each holder's operations stay in arrival order.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment<'a> {
    pub start: usize,
    pub end: usize,
    pub holders: Vec<Holder<'a>>,
}

type HolderKey<'a> = (&'a str, i128, &'a str);

/// The read's frames of the common shape as segments; the frames between segments are not
/// taken (the caller decodes them in Python, between the segments around them).
pub fn read<'a>(frames: &[&'a [u8]]) -> Vec<Segment<'a>> {
    let mut segments: Vec<Segment<'a>> = Vec::new();
    let mut at: HashMap<HolderKey<'a>, usize> = HashMap::new();
    let mut ops: Vec<(OpKind, u64)> = Vec::new();
    for (i, data) in frames.iter().enumerate() {
        ops.clear();
        let Some(f) = parse(data, &mut ops) else {
            continue;
        };
        let seg = match segments.last_mut() {
            Some(s) if s.end == i => s,
            _ => {
                at.clear();
                segments.push(Segment {
                    start: i,
                    end: i,
                    holders: Vec::new(),
                });
                segments.last_mut().expect("just pushed")
            }
        };
        seg.end = i + 1;
        let key = (f.instance_id, f.worker_id, f.location);
        // the usual read: every frame of one holder, so the last one is checked first
        let ix = match seg.holders.last() {
            Some(h) if (h.instance_id, h.worker_id, h.location) == key => seg.holders.len() - 1,
            _ => *at.entry(key).or_insert_with(|| {
                seg.holders.push(Holder {
                    instance_id: f.instance_id,
                    worker_id: f.worker_id,
                    location: f.location,
                    frames: 0,
                    first_seq: f.first_seq,
                    last_seq: f.first_seq - 1,
                    gaps: Vec::new(),
                    runs: Vec::new(),
                });
                seg.holders.len() - 1
            }),
        };
        let h = &mut seg.holders[ix];
        if h.frames > 0 && f.first_seq != h.last_seq + 1 {
            h.gaps.push((h.last_seq + 1, f.first_seq));
        }
        h.frames += 1;
        h.last_seq = f.last_seq;
        for &(kind, key) in &ops {
            match h.runs.last_mut() {
                Some(r) if r.kind == kind => r.keys.push(key),
                _ => h.runs.push(Run {
                    kind,
                    keys: vec![key],
                }),
            }
        }
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmp::encode as enc;

    fn frame(instance: &str, worker: i64, location: &str, ops: &[(&str, i128, i64)]) -> Vec<u8> {
        let mut out = Vec::new();
        enc::write_map_len(&mut out, 5).unwrap();
        enc::write_str(&mut out, "type").unwrap();
        enc::write_str(&mut out, "BatchedKVOperationMsg").unwrap();
        enc::write_str(&mut out, "instance_id").unwrap();
        enc::write_str(&mut out, instance).unwrap();
        enc::write_str(&mut out, "worker_id").unwrap();
        enc::write_sint(&mut out, worker).unwrap();
        enc::write_str(&mut out, "location").unwrap();
        enc::write_str(&mut out, location).unwrap();
        enc::write_str(&mut out, "operations").unwrap();
        enc::write_array_len(&mut out, ops.len() as u32).unwrap();
        for &(kind, key, seq) in ops {
            enc::write_map_len(&mut out, 3).unwrap();
            enc::write_str(&mut out, "op_type").unwrap();
            enc::write_str(&mut out, kind).unwrap();
            enc::write_str(&mut out, "key").unwrap();
            if key >= 0 {
                enc::write_uint(&mut out, key as u64).unwrap();
            } else {
                enc::write_sint(&mut out, key as i64).unwrap();
            }
            enc::write_str(&mut out, "seq_num").unwrap();
            enc::write_sint(&mut out, seq).unwrap();
        }
        out
    }

    fn sample() -> Vec<u8> {
        frame(
            "inst",
            3,
            "LocalCPUBackend",
            &[
                ("admit", -5, 7),
                ("admit", u64::MAX as i128, 8),
                ("evict", 9, 9),
            ],
        )
    }

    #[test]
    fn parses_the_common_shape() {
        let mut ops = Vec::new();
        let data = sample();
        let f = parse(&data, &mut ops).expect("taken");
        assert_eq!(
            (
                f.instance_id,
                f.worker_id,
                f.location,
                f.first_seq,
                f.last_seq
            ),
            ("inst", 3, "LocalCPUBackend", 7, 9)
        );
        assert_eq!(
            ops,
            vec![
                (OpKind::Admit, (-5i64) as u64),
                (OpKind::Admit, u64::MAX),
                (OpKind::Evict, 9)
            ]
        );
    }

    #[test]
    fn fields_in_any_order_are_taken() {
        let mut out = Vec::new();
        enc::write_map_len(&mut out, 5).unwrap();
        enc::write_str(&mut out, "operations").unwrap();
        enc::write_array_len(&mut out, 1).unwrap();
        enc::write_map_len(&mut out, 3).unwrap();
        enc::write_str(&mut out, "seq_num").unwrap();
        enc::write_uint(&mut out, 1).unwrap();
        enc::write_str(&mut out, "key").unwrap();
        enc::write_uint(&mut out, 2).unwrap();
        enc::write_str(&mut out, "op_type").unwrap();
        enc::write_str(&mut out, "evict").unwrap();
        for (k, v) in [("location", "L"), ("instance_id", "i")] {
            enc::write_str(&mut out, k).unwrap();
            enc::write_str(&mut out, v).unwrap();
        }
        enc::write_str(&mut out, "worker_id").unwrap();
        enc::write_uint(&mut out, u64::MAX).unwrap();
        enc::write_str(&mut out, "type").unwrap();
        enc::write_str(&mut out, "BatchedKVOperationMsg").unwrap();
        let mut ops = Vec::new();
        let f = parse(&out, &mut ops).expect("taken");
        assert_eq!((f.worker_id, f.first_seq), (u64::MAX as i128, 1));
        assert_eq!(ops, vec![(OpKind::Evict, 2)]);
    }

    #[test]
    fn ints_of_every_width_read_as_rmp_reads_them() {
        let values: [i128; 12] = [
            0,
            127,
            128,
            -1,
            -32,
            -33,
            -129,
            70_000,
            -70_000,
            i64::MIN as i128,
            i64::MAX as i128,
            u64::MAX as i128,
        ];
        for v in values {
            let mut encodings: Vec<Vec<u8>> = Vec::new();
            let mut compact = Vec::new();
            if v >= 0 {
                enc::write_uint(&mut compact, v as u64).unwrap();
                let mut wide = Vec::new();
                enc::write_u64(&mut wide, v as u64).unwrap();
                encodings.push(wide);
            } else {
                enc::write_sint(&mut compact, v as i64).unwrap();
            }
            encodings.push(compact);
            if let Ok(v64) = i64::try_from(v) {
                let mut wide = Vec::new();
                enc::write_i64(&mut wide, v64).unwrap();
                encodings.push(wide);
            }
            for e in encodings {
                let (mut a, mut b) = (&e[..], &e[..]);
                assert_eq!(any_int(&mut a).ok(), Some(v), "{e:?}");
                assert_eq!(int(&mut b).ok(), Some(v));
                assert!(a.is_empty() && b.is_empty());
            }
        }
        for short in [&[0xcdu8, 1][..], &[0xcf, 0, 0], &[0xd3], &[]] {
            let mut rd = short;
            assert!(any_int(&mut rd).is_err());
        }
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let full = sample();
        let mut ops = vec![(OpKind::Admit, 1)];
        for end in 0..full.len() {
            assert!(
                parse(&full[..end], &mut ops).is_none(),
                "truncated at {end}"
            );
            assert_eq!(ops.len(), 1, "a refused frame left operations behind");
        }
        let mut longer = full.clone();
        longer.push(0xc0);
        assert!(parse(&longer, &mut ops).is_none());
    }

    #[test]
    fn other_shapes_are_left_to_python() {
        let mut ops = Vec::new();
        let refused = [
            frame("i", 0, "", &[("admit", 1, 0)]), // no location
            frame("i", 0, "L", &[]),               // no operations
            frame("i", 0, "L", &[("pin", 1, 0)]),  // unknown op
            frame(&"x".repeat(MAX_NAME_BYTES + 1), 0, "L", &[("admit", 1, 0)]),
        ];
        for f in &refused {
            assert!(parse(f, &mut ops).is_none());
        }
        // another message type, an extra field
        let other = sample().replacen(b"BatchedKVOperationMsg", b"BatchedKVOperationMsX");
        assert!(parse(&other, &mut ops).is_none());
        let mut extra = sample();
        extra[0] = 0x86;
        extra.extend_from_slice(b"\xa1x\x01");
        assert!(parse(&extra, &mut ops).is_none());
        // a repeated field in place of another
        let repeated = sample().replacen(b"\xa9worker_id", b"\xa9location");
        assert!(parse(&repeated, &mut ops).is_none());
        // invalid UTF-8 in a name
        let bad = sample().replacen(b"inst", b"in\xffs");
        assert!(parse(&bad, &mut ops).is_none());
        assert!(ops.is_empty());
    }

    trait ReplaceN {
        fn replacen(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }

    impl ReplaceN for Vec<u8> {
        fn replacen(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let at = self
                .windows(from.len())
                .position(|w| w == from)
                .expect("present");
            [&self[..at], to, &self[at + from.len()..]].concat()
        }
    }

    #[test]
    fn reads_group_per_holder_with_gaps() {
        let frames = [
            frame("a", 0, "L", &[("admit", 1, 0), ("admit", 2, 1)]),
            frame("b", 0, "L", &[("admit", 3, 0)]),
            frame("a", 0, "L", &[("admit", 4, 2), ("evict", 1, 3)]),
            b"not msgpack".to_vec(),
            frame("a", 0, "L", &[("evict", 2, 9)]),
            frame("a", 0, "L", &[("admit", 5, 5)]),
        ];
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let segs = read(&refs);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].start, segs[0].end), (0, 3));
        let a = &segs[0].holders[0];
        assert_eq!(
            (a.instance_id, a.frames, a.first_seq, a.last_seq),
            ("a", 2, 0, 3)
        );
        assert!(a.gaps.is_empty());
        assert_eq!(
            a.runs,
            vec![
                Run {
                    kind: OpKind::Admit,
                    keys: vec![1, 2, 4]
                },
                Run {
                    kind: OpKind::Evict,
                    keys: vec![1]
                }
            ]
        );
        assert_eq!(segs[0].holders[1].instance_id, "b");
        assert_eq!((segs[1].start, segs[1].end), (4, 6));
        let a = &segs[1].holders[0];
        assert_eq!((a.first_seq, a.last_seq, a.frames), (9, 5, 2));
        assert_eq!(a.gaps, vec![(10, 5)]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut ops = Vec::new();
        for _ in 0..20_000 {
            let buf = crate::msgpack_read::mutated(&sample(), &mut x);
            let _ = read(&[&buf, &sample()]);
            let _ = parse(&buf, &mut ops);
        }
        // lengths that claim more than the frame holds
        let _ = parse(&[0xdf, 0xff, 0xff, 0xff, 0xff], &mut ops);
        let mut huge = sample();
        let at = huge.len() - 3 * 24;
        huge.truncate(at);
        let _ = parse(&huge, &mut ops);
    }
}
