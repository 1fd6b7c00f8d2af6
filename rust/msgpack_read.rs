//! Reading msgpack values from a byte slice for the parsers of untrusted payloads
//! (kv_payload.rs, lmcache_push.rs): every read is bounds-checked and fails with `Skip`
//! (the caller then leaves the payload to its Python decoder); nothing panics.

use rmp::decode::{read_marker, RmpRead};
use rmp::Marker;

/// Not taken (malformed, or a shape left to the Python decoder).
pub struct Skip;
pub type R<T> = Result<T, Skip>;

pub fn marker(rd: &mut &[u8]) -> R<Marker> {
    read_marker(rd).map_err(|_| Skip)
}

pub fn peek(rd: &[u8]) -> R<Marker> {
    rd.first().map(|&b| Marker::from_u8(b)).ok_or(Skip)
}

pub fn take<'a>(rd: &mut &'a [u8], n: usize) -> R<&'a [u8]> {
    if rd.len() < n {
        return Err(Skip);
    }
    let (head, tail) = rd.split_at(n);
    *rd = tail;
    Ok(head)
}

/// An integer of any msgpack width, or `None` when the value is not an integer.
pub fn int_after(rd: &mut &[u8], m: Marker) -> R<Option<i128>> {
    let e = |_| Skip;
    Ok(Some(match m {
        Marker::FixPos(v) => v as i128,
        Marker::FixNeg(v) => v as i128,
        Marker::U8 => rd.read_data_u8().map_err(e)? as i128,
        Marker::U16 => rd.read_data_u16().map_err(e)? as i128,
        Marker::U32 => rd.read_data_u32().map_err(e)? as i128,
        Marker::U64 => rd.read_data_u64().map_err(e)? as i128,
        Marker::I8 => rd.read_data_i8().map_err(e)? as i128,
        Marker::I16 => rd.read_data_i16().map_err(e)? as i128,
        Marker::I32 => rd.read_data_i32().map_err(e)? as i128,
        Marker::I64 => rd.read_data_i64().map_err(e)? as i128,
        _ => return Ok(None),
    }))
}

pub fn int(rd: &mut &[u8]) -> R<i128> {
    let m = marker(rd)?;
    int_after(rd, m)?.ok_or(Skip)
}

pub fn len_of(rd: &mut &[u8], m: Marker) -> R<usize> {
    let e = |_| Skip;
    Ok(match m {
        Marker::FixArray(n) | Marker::FixMap(n) | Marker::FixStr(n) => n as usize,
        Marker::Str8 | Marker::Bin8 => rd.read_data_u8().map_err(e)? as usize,
        Marker::Array16 | Marker::Map16 | Marker::Str16 | Marker::Bin16 => {
            rd.read_data_u16().map_err(e)? as usize
        }
        Marker::Array32 | Marker::Map32 | Marker::Str32 | Marker::Bin32 => {
            rd.read_data_u32().map_err(e)? as usize
        }
        _ => return Err(Skip),
    })
}

pub fn array_len(rd: &mut &[u8]) -> R<usize> {
    let m = marker(rd)?;
    match m {
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => len_of(rd, m),
        _ => Err(Skip),
    }
}

pub fn is_str(m: Marker) -> bool {
    matches!(
        m,
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32
    )
}

/// A str's bytes (valid UTF-8, as the Python decoder requires).
pub fn str_after<'a>(rd: &mut &'a [u8], m: Marker) -> R<&'a [u8]> {
    let s = str_unchecked_after(rd, m)?;
    std::str::from_utf8(s).map_err(|_| Skip)?;
    Ok(s)
}

/// A str's bytes, not checked as UTF-8: only for strs whose use is to be compared with known
/// ASCII names, where anything else is refused (or counted as other) whatever its encoding.
pub fn str_unchecked_after<'a>(rd: &mut &'a [u8], m: Marker) -> R<&'a [u8]> {
    if !is_str(m) {
        return Err(Skip);
    }
    let n = len_of(rd, m)?;
    take(rd, n)
}

/// Test inputs for the parsers built on these readers: `sample` with three bytes overwritten
/// at places and with values drawn from the xorshift state `x`.
#[cfg(test)]
pub fn mutated(sample: &[u8], x: &mut u64) -> Vec<u8> {
    let mut buf = sample.to_vec();
    for _ in 0..3 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let i = (*x % buf.len() as u64) as usize;
        buf[i] = (*x >> 32) as u8;
    }
    buf
}
