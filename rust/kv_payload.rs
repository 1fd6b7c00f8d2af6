//! KV-event batch payloads (msgpack) as vLLM >= 0.24 and SGLang publish them, parsed without
//! Python objects: `[ts, [events], dp_rank]` (or `[ts, [events]]`) whose events are
//! `BlockStored` / `BlockRemoved` / `AllBlocksCleared` maps.
//!
//! Only the common shape is taken: every event of the main attention group, base model (no
//! LoRA), text only (`extra_keys` absent or all nil), int or byte hashes, u32 tokens, known
//! fields, ASCII media. Anything else, and anything malformed, gives `None`: the caller then
//! decodes the payload with the tolerant Python decoder, which counts what it skips. So a
//! payload taken here is one the Python decoder reads to the same events.

use std::sync::Arc;

use rmp::decode::RmpRead;
use rmp::Marker;

use crate::engine_map::{location_of, EngineHash};
use crate::msgpack_read::{
    array_len, int, int_after, is_str, len_of, marker, peek, str_after, str_unchecked_after, take,
    Skip, R,
};

pub const MAX_HASH_BYTES: usize = 64;
const MAX_BLOCK_SIZE: u64 = 1 << 20;
const MAX_DEPTH: usize = 32;
/// Attention kinds whose blocks form a prefix (as `PREFIX_KINDS` in kv_events.py).
const PREFIX_KINDS: [&[u8]; 3] = [b"full_attention", b"mla_attention", b"sink_full_attention"];

/// One event; its hashes are `Parsed::hashes[hashes.0..hashes.1]`, its tokens likewise.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stored {
        hashes: (usize, usize),
        parent: Option<EngineHash>,
        tokens: (usize, usize),
        block_size: usize,
        location: u32,
    },
    Removed {
        hashes: (usize, usize),
        location: u32,
    },
    Cleared,
}

#[derive(Debug, Default, Clone)]
pub struct Parsed {
    pub ts: f64,
    pub dp_rank: u16,
    pub events: Vec<Event>,
    pub hashes: Vec<EngineHash>,
    pub tokens: Vec<u32>,
    /// Location names of the events' media (`Event::*::location` indexes this).
    pub locations: Vec<Arc<str>>,
}

impl Parsed {
    /// Block sizes of the stores that start a sequence (no parent) and name a namespace,
    /// in first-seen order: the caller makes sure those namespaces exist before applying.
    pub fn root_sizes(&self) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for ev in &self.events {
            if let Event::Stored {
                hashes,
                parent: None,
                tokens,
                block_size,
                ..
            } = ev
            {
                let (n, t) = (hashes.1 - hashes.0, tokens.1 - tokens.0);
                if t > 0 && *block_size >= 1 && t == n * block_size && !out.contains(block_size) {
                    out.push(*block_size);
                }
            }
        }
        out
    }

    pub fn cleared(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Cleared))
    }

    pub fn blocks(&self) -> usize {
        self.hashes.len()
    }
}

/// Steps over one value of any type; ext types (timestamps and others) are left to Python.
fn skip(rd: &mut &[u8], depth: usize) -> R<()> {
    if depth > MAX_DEPTH {
        return Err(Skip);
    }
    let m = marker(rd)?;
    match m {
        Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {}
        Marker::U8 | Marker::I8 => drop(take(rd, 1)?),
        Marker::U16 | Marker::I16 => drop(take(rd, 2)?),
        Marker::U32 | Marker::I32 | Marker::F32 => drop(take(rd, 4)?),
        Marker::U64 | Marker::I64 | Marker::F64 => drop(take(rd, 8)?),
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => drop(str_after(rd, m)?),
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
            let n = len_of(rd, m)?;
            take(rd, n)?;
        }
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
            for _ in 0..len_of(rd, m)? {
                skip(rd, depth + 1)?;
            }
        }
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
            for _ in 0..len_of(rd, m)? {
                // keys Python can hash for sure; anything else is left to it
                let k = peek(rd)?;
                if !(is_str(k) || matches!(k, Marker::FixPos(_) | Marker::FixNeg(_))) {
                    return Err(Skip);
                }
                skip(rd, depth + 1)?;
                skip(rd, depth + 1)?;
            }
        }
        _ => return Err(Skip),
    }
    Ok(())
}

fn hash_after(rd: &mut &[u8], m: Marker) -> R<EngineHash> {
    if let Some(v) = int_after(rd, m)? {
        return Ok(EngineHash::from_int(v));
    }
    match m {
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
            let n = len_of(rd, m)?;
            if n == 0 || n > MAX_HASH_BYTES {
                return Err(Skip);
            }
            Ok(EngineHash::Bytes(take(rd, n)?.into()))
        }
        _ => Err(Skip),
    }
}

fn hashes(rd: &mut &[u8], out: &mut Vec<EngineHash>) -> R<(usize, usize)> {
    let start = out.len();
    for _ in 0..array_len(rd)? {
        let m = marker(rd)?;
        out.push(hash_after(rd, m)?);
    }
    Ok((start, out.len()))
}

/// (bytes taken, right shift of the 4 bytes after the marker) per marker byte; 0: other.
const TOKEN_WIDTH: [(u8, u8); 256] = {
    let mut t = [(0u8, 0u8); 256];
    let mut b = 0;
    while b < 0x80 {
        t[b] = (1, 0);
        b += 1;
    }
    t[0xcc] = (2, 24);
    t[0xcd] = (3, 16);
    t[0xce] = (5, 0);
    t
};

/// Token ids: every one an integer in u32's range.
fn tokens(rd: &mut &[u8], out: &mut Vec<u32>) -> R<(usize, usize)> {
    let n = array_len(rd)?;
    let start = out.len();
    if rd.len() < n {
        return Err(Skip); // each token takes a byte at least: a bogus length stops here
    }
    out.reserve(n);
    let buf: &[u8] = rd;
    let mut i = 0;
    for _ in 0..n {
        let b = *buf.get(i).ok_or(Skip)?;
        // the usual encodings (fixint, uint8/16/32) without a branch on which: the marker's
        // width from a table and the value shifted out of the 4 bytes after it (tokens
        // above and below 65,536 alternate unpredictably)
        let (width, shift) = TOKEN_WIDTH[b as usize];
        let v = match buf.get(i + 1..i + 5) {
            Some(d) if width > 0 => {
                let x = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
                i += width as usize;
                if b < 0x80 {
                    b as u32
                } else {
                    (x >> shift) as u32
                }
            }
            _ => {
                let mut r = &buf[i..];
                let v = u32::try_from(int(&mut r)?).map_err(|_| Skip)?;
                i = buf.len() - r.len();
                v
            }
        };
        out.push(v);
    }
    *rd = &buf[i..];
    Ok((start, out.len()))
}

#[derive(Clone, Copy, PartialEq)]
enum Group {
    Absent,
    Zero,
    Other,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

/// The bit a field name takes in an event's `seen` set (its position in STORED_FIELDS order).
fn field_bit(key: &[u8]) -> Option<u32> {
    Some(match key {
        b"type" => 0,
        b"block_hashes" => 1,
        b"parent_block_hash" => 2,
        b"token_ids" => 3,
        b"block_size" => 4,
        b"medium" => 5,
        b"lora_name" => 6,
        b"extra_keys" => 7,
        b"group_idx" => 8,
        b"kv_cache_spec_kind" => 9,
        b"lora_id" => 10,
        b"kv_cache_spec_sliding_window" => 11,
        b"locality" => 12,
        b"ownership" => 13,
        b"session_id" => 14,
        b"lookahead_token_ids" => 15,
        _ => return None,
    })
}
const BIT_TYPE: u32 = 1;
const BIT_HASHES: u32 = 1 << 1;
const BIT_TOKENS: u32 = 1 << 3;
const BIT_SIZE: u32 = 1 << 4;
const STORED_FIELDS: u32 = (1 << 16) - 1;
/// type, block_hashes, medium, group_idx, locality, ownership.
const REMOVED_FIELDS: u32 = 1 | (1 << 1) | (1 << 5) | (1 << 8) | (1 << 12) | (1 << 13);

struct Parser<'a> {
    out: Parsed,
    /// Media seen in this payload -> their `locations` index (the same few on every event).
    media: Vec<(Option<&'a [u8]>, u32)>,
}

impl<'a> Parser<'a> {
    fn location(&mut self, medium: Option<&'a [u8]>) -> R<u32> {
        if let Some(&(_, ix)) = self.media.iter().find(|(m, _)| *m == medium) {
            return Ok(ix);
        }
        let ix = self.location_ix(medium)?;
        self.media.push((medium, ix));
        Ok(ix)
    }

    fn location_ix(&mut self, medium: Option<&[u8]>) -> R<u32> {
        let name = match medium {
            None => location_of(None),
            Some(m) if m.is_ascii() => location_of(Some(std::str::from_utf8(m).map_err(|_| Skip)?)),
            Some(_) => return Err(Skip), // non-ASCII names: Python's own case and printability rules
        };
        let locs = &mut self.out.locations;
        if let Some(i) = locs.iter().position(|l| **l == *name) {
            return Ok(i as u32);
        }
        locs.push(name);
        Ok(locs.len() as u32 - 1)
    }

    fn event(&mut self, rd: &mut &'a [u8]) -> R<()> {
        let m = marker(rd)?;
        if !matches!(m, Marker::FixMap(_) | Marker::Map16 | Marker::Map32) {
            return Err(Skip);
        }
        let mut seen = 0u32;
        let mut kind = None;
        let mut hashes_at = (0, 0);
        let mut tokens_at = (0, 0);
        let mut parent = None;
        let mut block_size = 0usize;
        let mut medium: Option<&[u8]> = None;
        let mut group = Group::Absent;
        let mut spec_kind = Group::Absent; // Zero here: a prefix kind
        for _ in 0..len_of(rd, m)? {
            let km = marker(rd)?;
            // names are compared with known ASCII ones (any other is refused): no UTF-8 check
            let key = str_unchecked_after(rd, km)?;
            let bit = field_bit(key).ok_or(Skip)?;
            if seen & (1 << bit) != 0 {
                return Err(Skip);
            }
            seen |= 1 << bit;
            match bit {
                0 => {
                    let vm = marker(rd)?;
                    kind = Some(match str_unchecked_after(rd, vm)? {
                        b"BlockStored" => Kind::Stored,
                        b"BlockRemoved" => Kind::Removed,
                        b"AllBlocksCleared" => Kind::Cleared,
                        _ => return Err(Skip),
                    });
                }
                1 => hashes_at = hashes(rd, &mut self.out.hashes)?,
                2 => {
                    let vm = marker(rd)?;
                    if vm != Marker::Null {
                        parent = Some(hash_after(rd, vm)?);
                    }
                }
                3 => tokens_at = tokens(rd, &mut self.out.tokens)?,
                4 => {
                    let v = int(rd)?;
                    if !(0..=MAX_BLOCK_SIZE as i128).contains(&v) {
                        return Err(Skip);
                    }
                    block_size = v as usize;
                }
                5 => {
                    let vm = marker(rd)?;
                    if vm != Marker::Null {
                        medium = Some(str_after(rd, vm)?);
                    }
                }
                6 => {
                    if marker(rd)? != Marker::Null {
                        return Err(Skip); // LoRA: its own namespace
                    }
                }
                7 => {
                    let vm = marker(rd)?;
                    if vm != Marker::Null {
                        if !matches!(vm, Marker::FixArray(_) | Marker::Array16 | Marker::Array32) {
                            return Err(Skip);
                        }
                        for _ in 0..len_of(rd, vm)? {
                            if marker(rd)? != Marker::Null {
                                return Err(Skip); // salts, multimodal inputs
                            }
                        }
                    }
                }
                8 => {
                    group = match peek(rd)? {
                        Marker::Null => Group::Absent,
                        Marker::FixPos(0) => Group::Zero,
                        _ => Group::Other,
                    };
                    skip(rd, 0)?;
                }
                9 => {
                    let vm = marker(rd)?;
                    spec_kind = if vm == Marker::Null {
                        Group::Absent
                    } else if PREFIX_KINDS.contains(&str_unchecked_after(rd, vm)?) {
                        Group::Zero
                    } else {
                        Group::Other
                    };
                }
                _ => skip(rd, 0)?,
            }
        }
        let (allowed, required) = match kind.ok_or(Skip)? {
            Kind::Stored => (STORED_FIELDS, BIT_TYPE | BIT_HASHES | BIT_TOKENS | BIT_SIZE),
            Kind::Removed => (REMOVED_FIELDS, BIT_TYPE | BIT_HASHES),
            Kind::Cleared => (BIT_TYPE, BIT_TYPE),
        };
        if seen & !allowed != 0 || seen & required != required {
            return Err(Skip);
        }
        // the main attention group only: by kind when named, else group 0 (or none)
        let main = match spec_kind {
            Group::Zero => true,
            Group::Other => false,
            Group::Absent => group != Group::Other,
        };
        if !main {
            return Err(Skip); // other groups are counted by the Python decoder
        }
        let ev = match kind {
            Some(Kind::Stored) => Event::Stored {
                hashes: hashes_at,
                parent,
                tokens: tokens_at,
                block_size,
                location: self.location(medium)?,
            },
            Some(Kind::Removed) => Event::Removed {
                hashes: hashes_at,
                location: self.location(medium)?,
            },
            _ => Event::Cleared,
        };
        self.out.events.push(ev);
        Ok(())
    }

    fn batch(&mut self, mut rd: &'a [u8]) -> R<()> {
        let rd = &mut rd;
        let n = match marker(rd)? {
            Marker::FixArray(n @ 2..=3) => n,
            _ => return Err(Skip),
        };
        let m = marker(rd)?;
        self.out.ts = match m {
            Marker::F64 => rd.read_data_f64().map_err(|_| Skip)?,
            Marker::F32 => rd.read_data_f32().map_err(|_| Skip)? as f64,
            _ => int_after(rd, m)?.ok_or(Skip)? as f64,
        };
        for _ in 0..array_len(rd)? {
            self.event(rd)?;
        }
        if n == 3 && peek(rd)? != Marker::Null {
            let rank = int(rd)?;
            self.out.dp_rank = u16::try_from(rank).map_err(|_| Skip)?;
        } else if n == 3 {
            take(rd, 1)?;
        }
        if !rd.is_empty() {
            return Err(Skip); // trailing bytes: not one msgpack value
        }
        Ok(())
    }
}

/// The batch in `payload`, or `None` when it is not one this parser takes (see the module doc).
pub fn parse(payload: &[u8]) -> Option<Parsed> {
    let mut p = Parser {
        out: Parsed::default(),
        media: Vec::new(),
    };
    p.batch(payload).ok()?;
    Some(p.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmp::encode as enc;

    fn stored(
        out: &mut Vec<u8>,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u64],
        medium: &str,
    ) {
        enc::write_map_len(out, 7).unwrap();
        enc::write_str(out, "type").unwrap();
        enc::write_str(out, "BlockStored").unwrap();
        enc::write_str(out, "block_hashes").unwrap();
        enc::write_array_len(out, hashes.len() as u32).unwrap();
        for &h in hashes {
            enc::write_uint(out, h).unwrap();
        }
        enc::write_str(out, "parent_block_hash").unwrap();
        match parent {
            Some(p) => drop(enc::write_uint(out, p).unwrap()),
            None => enc::write_nil(out).unwrap(),
        }
        enc::write_str(out, "token_ids").unwrap();
        enc::write_array_len(out, tokens.len() as u32).unwrap();
        for &t in tokens {
            enc::write_uint(out, t).unwrap();
        }
        enc::write_str(out, "block_size").unwrap();
        enc::write_uint(out, 2).unwrap();
        enc::write_str(out, "medium").unwrap();
        enc::write_str(out, medium).unwrap();
        enc::write_str(out, "group_idx").unwrap();
        enc::write_uint(out, 0).unwrap();
    }

    fn batch(events: impl FnOnce(&mut Vec<u8>) -> u32) -> Vec<u8> {
        let mut body = Vec::new();
        let n = events(&mut body);
        let mut out = Vec::new();
        enc::write_array_len(&mut out, 3).unwrap();
        enc::write_f64(&mut out, 1.5).unwrap();
        enc::write_array_len(&mut out, n).unwrap();
        out.extend_from_slice(&body);
        enc::write_uint(&mut out, 2).unwrap();
        out
    }

    fn sample() -> Vec<u8> {
        batch(|b| {
            stored(b, &[7, u64::MAX], None, &[1, 2, 300, 70000], "cpu");
            enc::write_map_len(b, 1).unwrap();
            enc::write_str(b, "type").unwrap();
            enc::write_str(b, "AllBlocksCleared").unwrap();
            2
        })
    }

    #[test]
    fn parses_the_common_shape() {
        let p = parse(&sample()).expect("taken");
        assert_eq!((p.ts, p.dp_rank), (1.5, 2));
        assert_eq!(p.tokens, vec![1, 2, 300, 70000]);
        assert_eq!(
            p.hashes,
            vec![EngineHash::Int(7), EngineHash::Int(u64::MAX)]
        );
        assert_eq!(&*p.locations[0], "LocalCPUBackend");
        assert_eq!(p.root_sizes(), vec![2]);
        assert!(p.cleared());
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let full = sample();
        for end in 0..full.len() {
            assert!(parse(&full[..end]).is_none(), "truncated at {end}");
        }
        let mut longer = full.clone();
        longer.push(0xc0);
        assert!(parse(&longer).is_none());
    }

    #[test]
    fn other_shapes_are_left_to_python() {
        // LoRA, an unknown field, a non-main group, tokens past u32
        for (key, value) in [
            ("lora_name", "x"),
            ("surprise", "x"),
            ("kv_cache_spec_kind", "sliding_window"),
        ] {
            let p = batch(|b| {
                enc::write_map_len(b, 5).unwrap();
                enc::write_str(b, "type").unwrap();
                enc::write_str(b, "BlockStored").unwrap();
                enc::write_str(b, "block_hashes").unwrap();
                enc::write_array_len(b, 0).unwrap();
                enc::write_str(b, "token_ids").unwrap();
                enc::write_array_len(b, 0).unwrap();
                enc::write_str(b, "block_size").unwrap();
                enc::write_uint(b, 2).unwrap();
                enc::write_str(b, key).unwrap();
                enc::write_str(b, value).unwrap();
                1
            });
            assert!(parse(&p).is_none(), "{key}");
        }
        let big = batch(|b| {
            stored(b, &[1], None, &[1, u32::MAX as u64 + 1], "GPU");
            1
        });
        assert!(parse(&big).is_none());
    }

    #[test]
    fn strings_that_are_not_utf8_are_refused() {
        // a field name, the type, the attention kind and the medium: bytes that are not UTF-8
        // (the Python decoder refuses such a payload; names are matched without a UTF-8 check)
        let bad: &[u8] = b"\xffblock_size";
        let with_raw_str = |b: &mut Vec<u8>, s: &[u8]| {
            enc::write_str_len(b, s.len() as u32).unwrap();
            b.extend_from_slice(s);
        };
        for field in 0..5 {
            let p = batch(|b| {
                enc::write_map_len(b, 5).unwrap();
                enc::write_str(b, "type").unwrap();
                match field {
                    1 => with_raw_str(b, b"Block\xffStored"),
                    _ => enc::write_str(b, "BlockStored").unwrap(),
                }
                enc::write_str(b, "block_hashes").unwrap();
                enc::write_array_len(b, 0).unwrap();
                enc::write_str(b, "token_ids").unwrap();
                enc::write_array_len(b, 0).unwrap();
                match field {
                    0 => with_raw_str(b, bad),
                    _ => enc::write_str(b, "block_size").unwrap(),
                }
                enc::write_uint(b, 2).unwrap();
                match field {
                    2 => {
                        enc::write_str(b, "kv_cache_spec_kind").unwrap();
                        with_raw_str(b, b"full_attention\xff");
                    }
                    _ => {
                        enc::write_str(b, "medium").unwrap();
                        with_raw_str(b, if field == 3 { b"GP\xffU" } else { b"GPU" });
                    }
                }
                1
            });
            // field 4: every string valid, the same payload is taken
            assert_eq!(parse(&p).is_none(), field < 4, "field {field}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let buf = crate::msgpack_read::mutated(&sample(), &mut x);
            let _ = parse(&buf);
        }
        // a length that claims more than the payload holds
        let _ = parse(&[
            0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff,
        ]);
    }
}
