//! The controller's /lookup hot path: parse the request body and render the response, in Rust.

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::hash::TokenCursor;
use crate::index::{DetailedMatch, Match};

/// Parse `{"tokens": [u32, ...], ...}` (other keys ignored).
pub fn parse_lookup_body(body: &[u8]) -> Result<Vec<u32>> {
    if let Some(tokens) = fast_tokens(body) {
        return Ok(tokens);
    }
    // serde_json skips ignored values without checking their UTF-8; a body that is not UTF-8
    // is not JSON, so check it whole.
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::arg(format!("bad /lookup body: not UTF-8 ({e})")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let tokens = de
        .deserialize_any(BodyVisitor)
        .and_then(|t| de.end().map(|_| t))
        .map_err(|e| Error::arg(format!("bad /lookup body: {e}")))?;
    tokens.ok_or_else(|| Error::arg("bad /lookup body: missing \"tokens\""))
}

/// The tokens of a `/lookup` body, for a lookup that may need only their first chunks: the
/// whole body is checked here (the same answers and errors as `parse_lookup_body`), and the
/// numbers of the usual list are read only as the walk takes them (`LazyTokens`).
pub fn parse_lookup_tokens(body: &[u8]) -> Result<BodyTokens<'_>> {
    if let Some(tokens) = tokens_member(body, checked_list) {
        return Ok(BodyTokens::Lazy(tokens));
    }
    Ok(BodyTokens::Parsed(parse_lookup_body(body)?, 0))
}

/// A body's tokens as `parse_lookup_tokens` gives them.
pub enum BodyTokens<'a> {
    /// A list checked whole, its numbers not yet read.
    Lazy(LazyTokens<'a>),
    /// A list read whole (a spelling `checked_list` leaves to the full parsers) and how many
    /// of its tokens were taken.
    Parsed(Vec<u32>, usize),
}

impl BodyTokens<'_> {
    /// How many tokens the list has.
    pub fn len(&self) -> usize {
        match self {
            BodyTokens::Lazy(t) => t.total,
            BodyTokens::Parsed(t, _) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every token not yet taken.
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            BodyTokens::Lazy(mut t) => {
                let n = t.left;
                t.take(n);
                t.taken
            }
            BodyTokens::Parsed(t, 0) => t,
            BodyTokens::Parsed(mut t, taken) => t.split_off(taken),
        }
    }
}

impl TokenCursor for BodyTokens<'_> {
    #[inline]
    fn remaining(&self) -> usize {
        match self {
            BodyTokens::Lazy(t) => t.left,
            BodyTokens::Parsed(t, taken) => t.len() - taken,
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> &[u32] {
        match self {
            BodyTokens::Lazy(t) => t.take(n),
            BodyTokens::Parsed(t, taken) => {
                *taken += n;
                &t[*taken - n..*taken]
            }
        }
    }
}

/// The numbers of a list that `checked_list` has checked, read front to back as they are
/// taken.
pub struct LazyTokens<'a> {
    body: &'a [u8],
    /// Where the next number is looked for: just after the list's `[` or the last number read.
    at: usize,
    left: usize,
    total: usize,
    taken: Vec<u32>,
    /// where the numbers being taken start (scratch space of `read_numbers`)
    starts: Vec<usize>,
}

impl LazyTokens<'_> {
    fn take(&mut self, n: usize) -> &[u32] {
        assert!(n <= self.left, "took {n} of {} tokens left", self.left);
        self.taken.resize(n, 0);
        self.at = read_numbers(self.body, self.at, &mut self.taken, &mut self.starts);
        self.left -= n;
        &self.taken
    }
}

/// The eager form of `tokens_member`: the list read by `fast_list`.
fn fast_tokens(b: &[u8]) -> Option<Vec<u32>> {
    tokens_member(b, fast_list)
}

/// A valid body `{"k": v, "tokens": [d, d, ...], ...}`, keys in any order, read in one pass:
/// the list by `list` (plain non-negative integers, any whitespace), each other key and
/// value by serde_json on its own, with the UTF-8 of every byte it skips checked (serde_json
/// does not check what it ignores; both list readers take ASCII only). None for anything else
/// (a duplicate or missing `tokens`, any error, a list `list` does not take): the full parser
/// then gives the answer or the error.
fn tokens_member<'a, T>(
    b: &'a [u8],
    list: impl Fn(&'a [u8], usize) -> Option<(T, usize)>,
) -> Option<T> {
    let mut tokens = None;
    object_members(b, |key, i| {
        if key == "tokens" {
            if tokens.is_some() {
                return None;
            }
            let (read, end) = list(b, i)?;
            tokens = Some(read);
            Some(end)
        } else {
            let n = one_value::<IgnoredAny>(&b[i..])?.1;
            std::str::from_utf8(&b[i..i + n]).ok()?;
            Some(i + n)
        }
    })?;
    tokens
}

/// Walk the object that is the whole of `b` (whitespace around it allowed): `member(key, i)`
/// reads the value starting at `b[i]` and returns the index just after it, or None to stop.
/// None when `b` is not such an object or a member stopped.
fn object_members(b: &[u8], mut member: impl FnMut(&str, usize) -> Option<usize>) -> Option<()> {
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(b, i + 1);
    loop {
        let (key, value_at) = member_key(b, i)?;
        i = ws(b, member(&key, value_at)?);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    (ws(b, i + 1) == b.len()).then_some(())
}

/// The key of the object member at `b[i]` (the usual spelling of `"tokens"` matched as bytes,
/// any other decoded) and where its value starts, past the colon and whitespace.
fn member_key(b: &[u8], i: usize) -> Option<(std::borrow::Cow<'_, str>, usize)> {
    let (key, n) = if b[i..].starts_with(b"\"tokens\"") {
        (std::borrow::Cow::Borrowed("tokens"), b"\"tokens\"".len())
    } else {
        one_value::<std::borrow::Cow<'_, str>>(&b[i..])?
    };
    let i = ws(b, i + n);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some((key, ws(b, i + 1)))
}

/// Whether the top-level object of a `/lookup` body gives one of `names` a value other than
/// null. The usual body is read for its structure only: its tokens list is skipped to its `]`
/// (found with memchr) without reading a number. Anything that reading does not follow is
/// parsed whole by serde_json. Exact for every JSON body (a duplicated name counts if any of
/// its values is not null; a JSON value that is not an object names nothing); for a body that
/// is not JSON the answer is unspecified (the lookup refuses it, however it is routed).
pub fn names_any(b: &[u8], names: &[&str]) -> bool {
    if names.is_empty() {
        return false;
    }
    names_any_skimmed(b, names).unwrap_or_else(|| names_any_parsed(b, names))
}

/// `names_any` for the usual shapes; None where the full parse must decide. (Public for the
/// fuzz oracle, which holds it to `names_any_parsed`.)
#[doc(hidden)]
pub fn names_any_skimmed(b: &[u8], names: &[&str]) -> Option<bool> {
    let mut found = false;
    object_members(b, |key, i| {
        if key == "tokens" && b.get(i) == Some(&b'[') && !names.contains(&"tokens") {
            // with no quote and no inner list before it, the first `]` ends the list
            let end = i + 1 + memchr::memchr3(b']', b'"', b'[', &b[i + 1..])?;
            (b[end] == b']').then_some(end + 1)
        } else if names.contains(&key) {
            let (value, n) = one_value::<Option<IgnoredAny>>(&b[i..])?;
            found |= value.is_some();
            Some(i + n)
        } else {
            Some(i + one_value::<IgnoredAny>(&b[i..])?.1)
        }
    })?;
    Some(found)
}

/// `names_any` by a full parse.
#[doc(hidden)]
pub fn names_any_parsed(b: &[u8], names: &[&str]) -> bool {
    struct Names<'n>(&'n [&'n str]);
    impl<'de> Visitor<'de> for Names<'_> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<bool, A::Error> {
            let mut found = false;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if self.0.contains(&key.as_ref()) {
                    found |= map.next_value::<Option<IgnoredAny>>()?.is_some();
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(b);
    de.deserialize_any(Names(names))
        .and_then(|found| de.end().map(|_| found))
        .unwrap_or(false)
}

/// The JSON value at the start of `b` and the bytes it takes.
fn one_value<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Option<(T, usize)> {
    let mut stream = serde_json::Deserializer::from_slice(b).into_iter::<T>();
    let value = stream.next()?.ok()?;
    Some((value, stream.byte_offset()))
}

/// The list `[d, d, ...]` starting at `b[i]`, of plain non-negative integers and any whitespace:
/// its tokens and the index just after its `]`. None for anything else.
///
/// Every byte is checked. Where each number starts comes from a bit mask of the digits, 64
/// bytes at a time (`digit_mask`), so finding the next number does not wait on reading the one
/// before; each is read from one 8-byte word (`swar_number`, up to 7 digits; `scalar_number`
/// otherwise), and the bytes between two numbers must be one comma and whitespace
/// (`separator`). What follows the last number found in whole 64-byte blocks (the body's last
/// bytes, or the list's end) is read one byte at a time.
fn fast_list(b: &[u8], i: usize) -> Option<(Vec<u32>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    // each token takes at least 2 bytes ("d,"), most bodies 5-8
    let mut out = Vec::with_capacity(b.len() / 5 + 1);
    // just past the '[' or the last number read: a separator must come next
    let mut end = i + 1;
    let mut block = i + 1;
    // the last byte of the previous block was a digit (the run goes on: not a new number)
    let mut carry = 0u64;
    while block + 64 <= b.len() {
        let digits = digit_mask(b, block);
        let mut starts = digits & !((digits << 1) | carry);
        carry = digits >> 63;
        while starts != 0 {
            let at = block + starts.trailing_zeros() as usize;
            starts &= starts - 1;
            match separator(b, end, at, out.is_empty()) {
                Separator::Next => {}
                Separator::Close(after) => return Some((out, after)),
                Separator::Bad => return None,
            }
            let (v, n) = number(b, at)?;
            out.push(v);
            end = at + n;
        }
        block += 64;
    }
    // the rest, one byte at a time from just after the last number (no digit is left in the
    // blocks read above): whitespace and `]`, or a separator and a number
    loop {
        let j = ws(b, end);
        let at = match b.get(j) {
            Some(b']') => return Some((out, j + 1)),
            Some(b',') if !out.is_empty() => ws(b, j + 1),
            Some(_) if out.is_empty() => j,
            _ => return None,
        };
        let (v, n) = number(b, at)?;
        out.push(v);
        end = at + n;
    }
}

/// The list `[d, d, ...]` starting at `b[i]`, checked whole without reading its numbers: its
/// numbers (to read with `read_numbers`) and the index just after its `]`. Takes a subset of
/// what `fast_list` takes (numbers of up to 9 digits; longer ones are left to it), 64 bytes
/// at a time with no work per number: every byte is a digit, a comma or whitespace up to the
/// `]`, and, with whitespace left out, digit runs and single commas alternate, with no comma
/// first or last and no number with a leading zero. With no comma first, last or after
/// another, there is one comma fewer than numbers iff every two numbers have a comma between
/// them, so counting both checks that.
fn checked_list(b: &[u8], i: usize) -> Option<(LazyTokens<'_>, usize)> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("popcnt")
        && std::arch::is_x86_feature_detected!("lzcnt")
    {
        // SAFETY: this CPU has AVX2, POPCNT and LZCNT (checked just above)
        return unsafe { checked_list_avx2(b, i) };
    }
    checked_list_by(b, i, classify)
}

/// `checked_list` with 32-byte compares and one-instruction bit counts (without POPCNT a
/// count is a dozen instructions); AVX2, POPCNT and LZCNT must be there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,lzcnt")]
unsafe fn checked_list_avx2(b: &[u8], i: usize) -> Option<(LazyTokens<'_>, usize)> {
    // SAFETY: the caller made sure that this CPU has AVX2
    checked_list_by(b, i, |block| unsafe { classify_avx2(block) })
}

#[inline(always)]
fn checked_list_by(
    b: &[u8],
    i: usize,
    classify: impl Fn(&[u8; 64]) -> Classes,
) -> Option<(LazyTokens<'_>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let first = i + 1;
    let mut block = first;
    let mut count = 0usize;
    let mut commas = 0usize;
    // what the bytes before this block end with, as bits for its byte -1 (the '[' counts as
    // a comma: no comma may follow it)
    let mut digit_before = 0u64;
    let mut comma_before = 1u64;
    // the previous block's digits, for runs of ten digits across the boundary
    let mut digits_before = 0u64;
    // a whitespace run after a comma reached the previous block's end
    let mut space_after_comma = 0u64;
    // the previous block ended with a number's first digit, a '0'
    let mut zero_start = 0u64;
    // the last digit or comma seen was a comma (or the '[')
    let mut last_comma = true;
    let mut tail = [0u8; 64];
    loop {
        let bytes: &[u8; 64] = match b.get(block..block + 64) {
            Some(whole) => whole.try_into().expect("64 bytes"),
            None => {
                // the body's last bytes, then zeros: not list bytes, so the list ends there
                let rest = b.len().saturating_sub(block);
                tail[..rest].copy_from_slice(&b[block..]);
                &tail
            }
        };
        let Classes {
            mut digit,
            mut comma,
            mut space,
            mut zero,
        } = classify(bytes);
        let other = !(digit | comma | space);
        let end = (other != 0).then(|| other.trailing_zeros());
        if let Some(e) = end {
            let list = (1u64 << e) - 1;
            (digit, comma, space, zero) = (digit & list, comma & list, space & list, zero & list);
        }
        // bit k: byte k - 1 is a digit (a comma)
        let after_digit = (digit << 1) | digit_before;
        let after_comma = (comma << 1) | comma_before;
        let starts = digit & !after_digit;
        count += starts.count_ones() as usize;
        commas += comma.count_ones() as usize;
        let mut bad = comma & after_comma;
        // the byte after each whitespace run: adding a run's first bit carries past its end
        let (sum, o1) = space.overflowing_add(space & after_comma);
        let (sum, o2) = sum.overflowing_add(space_after_comma);
        space_after_comma = u64::from(o1 | o2);
        bad |= sum & !space & comma;
        let zero_starts = starts & zero;
        bad |= ((zero_starts << 1) | zero_start) & digit;
        if bad != 0 {
            return None;
        }
        // bit k of `run(n)`: bytes k - n + 1 ..= k are digits (this block's bits on top)
        let run1 = (u128::from(digit) << 64) | u128::from(digits_before);
        let run2 = run1 & (run1 << 1);
        let run4 = run2 & (run2 << 2);
        let run8 = run4 & (run4 << 4);
        if (run8 & (run2 << 8)) >> 64 != 0 {
            return None;
        }
        let marks = digit | comma;
        if marks != 0 {
            last_comma = comma & (1 << (63 - marks.leading_zeros())) != 0;
        }
        if let Some(e) = end {
            let close = block + e as usize;
            if b.get(close) != Some(&b']')
                || (last_comma && count > 0)
                || commas + 1 != count.max(1)
            {
                return None;
            }
            let tokens = LazyTokens {
                body: b,
                at: first,
                left: count,
                total: count,
                taken: Vec::new(),
                starts: Vec::new(),
            };
            return Some((tokens, close + 1));
        }
        digit_before = digit >> 63;
        comma_before = comma >> 63;
        digits_before = digit;
        zero_start = zero_starts >> 63;
        block += 64;
    }
}

/// The next `out.len()` numbers of a list `checked_list` took, from `b[at]` (never inside a
/// number), written to `out`; returns the index just after the last one. Two passes: where
/// the numbers start (from digit masks), then their values, four at a time with AVX2. One
/// pass that read each number as its start was found was about twice as slow: a chain of
/// dependent steps per number, and a mispredicted branch where each 64-byte block's numbers
/// ran out.
fn read_numbers(b: &[u8], at: usize, out: &mut [u32], starts: &mut Vec<usize>) -> usize {
    let n = out.len();
    if n == 0 {
        return at;
    }
    number_starts(b, at, n, starts);
    let starts = &starts[..n];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2 (checked just above)
        unsafe { numbers_at_avx2(b, starts, out) };
        let last = starts[n - 1];
        return last + number(b, last).expect("checked_list took the number").1;
    }
    numbers_at(b, starts, out, 0)
}

/// The starts of at least `n` numbers from `b[at]` (never inside a number) into `starts`, in
/// order (it may hold more).
fn number_starts(b: &[u8], at: usize, n: usize, starts: &mut Vec<usize>) {
    // a block's starts are written 8 at a time whether there are 8 or not (no branch per
    // number), so `starts` has room for a whole block past the n-th
    starts.resize(n + 64, 0);
    let mut k = 0;
    let mut block = at;
    let mut digit_before = 0u64;
    while k < n && block + 64 <= b.len() {
        let digits = digit_mask(b, block);
        let mut bits = digits & !((digits << 1) | digit_before);
        digit_before = digits >> 63;
        let count = bits.count_ones() as usize;
        let slots = &mut starts[k..k + 64];
        let mut j = 0;
        while j < count {
            for slot in &mut slots[j..j + 8] {
                // past the last start trailing_zeros is 64: a slot written but never used
                *slot = block + bits.trailing_zeros() as usize;
                bits &= bits.wrapping_sub(1);
            }
            j += 8;
        }
        k += count;
        block += 64;
    }
    // the list's last bytes, one at a time
    let mut i = block;
    let mut after_digit = digit_before != 0;
    while k < n {
        let digit = b[i].is_ascii_digit();
        if digit && !after_digit {
            starts[k] = i;
            k += 1;
        }
        after_digit = digit;
        i += 1;
    }
}

/// The numbers starting at `starts[from..]`, into `out[from..]`; returns the index just after
/// the last one.
fn numbers_at(b: &[u8], starts: &[usize], out: &mut [u32], from: usize) -> usize {
    let mut end = 0;
    for (value, &s) in out[from..].iter_mut().zip(&starts[from..]) {
        let (v, len) = number(b, s).expect("checked_list took the number");
        *value = v;
        end = s + len;
    }
    end
}

/// `numbers_at` for four numbers at a time: each number's 8-byte word in one 64-bit lane, its
/// leading digits found and moved to the lane's top, and the digits combined by pairs, quads
/// and eights with multiply-adds. A group with a number of 8 or more digits is read one number
/// at a time, and so are the numbers too near the end of `b` for 8-byte reads. Returns how
/// many numbers were read four at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn numbers_at_avx2(b: &[u8], starts: &[usize], out: &mut [u32]) -> usize {
    use std::arch::x86_64::{
        _mm256_add_epi64, _mm256_and_si256, _mm256_castsi256_si128, _mm256_cmpeq_epi64,
        _mm256_cmpeq_epi8, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_min_epu8,
        _mm256_movemask_epi8, _mm256_mul_epu32, _mm256_or_si256, _mm256_permutevar8x32_epi32,
        _mm256_sad_epu8, _mm256_set1_epi64x, _mm256_set1_epi8, _mm256_set_epi32, _mm256_set_epi64x,
        _mm256_setzero_si256, _mm256_slli_epi64, _mm256_sllv_epi64, _mm256_srli_epi64,
        _mm256_sub_epi64, _mm256_sub_epi8, _mm_storeu_si128,
    };
    assert_eq!(starts.len(), out.len(), "one start for each number");
    let n = starts.len();
    let word = |s: usize| {
        b.get(s..s + 8)
            .map(|w| i64::from_le_bytes(w.try_into().expect("8 bytes")))
    };
    let mut i = 0;
    let mut grouped = 0;
    while i + 4 <= n {
        let (Some(w0), Some(w1), Some(w2), Some(w3)) = (
            word(starts[i]),
            word(starts[i + 1]),
            word(starts[i + 2]),
            word(starts[i + 3]),
        ) else {
            break;
        };
        let x = _mm256_sub_epi8(
            _mm256_set_epi64x(w3, w2, w1, w0),
            _mm256_set1_epi8(b'0' as i8),
        );
        let digit = _mm256_cmpeq_epi8(_mm256_min_epu8(x, _mm256_set1_epi8(9)), x);
        // the lane's leading digits: byte k stays set iff bytes 0..=k are all digits
        let mut lead = digit;
        lead = _mm256_and_si256(
            lead,
            _mm256_or_si256(_mm256_slli_epi64(lead, 8), _mm256_set1_epi64x(0xff)),
        );
        lead = _mm256_and_si256(
            lead,
            _mm256_or_si256(_mm256_slli_epi64(lead, 16), _mm256_set1_epi64x(0xffff)),
        );
        lead = _mm256_and_si256(
            lead,
            _mm256_or_si256(_mm256_slli_epi64(lead, 32), _mm256_set1_epi64x(0xffff_ffff)),
        );
        // 8 x the number of digits, per lane (psadbw sums a lane's bytes)
        let bits = _mm256_sad_epu8(
            _mm256_and_si256(lead, _mm256_set1_epi8(8)),
            _mm256_setzero_si256(),
        );
        if _mm256_movemask_epi8(_mm256_cmpeq_epi64(bits, _mm256_set1_epi64x(64))) != 0 {
            // 8 digits or more: the number may go on past its word
            numbers_at(b, &starts[..i + 4], &mut out[..i + 4], i);
            i += 4;
            continue;
        }
        // the digits to the lane's top bytes (what is above them shifted out): an 8-digit
        // number with leading zeros, most significant digit in the lowest byte
        let v = _mm256_sllv_epi64(x, _mm256_sub_epi64(_mm256_set1_epi64x(64), bits));
        let pairs = _mm256_maddubs_epi16(v, _mm256_set1_epi64x(0x010a_010a_010a_010a));
        let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi64x(0x0001_0064_0001_0064));
        let eights = _mm256_add_epi64(
            _mm256_mul_epu32(quads, _mm256_set1_epi64x(10_000)),
            _mm256_srli_epi64(quads, 32),
        );
        let packed = _mm256_permutevar8x32_epi32(eights, _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0));
        // SAFETY: i + 4 <= n = out.len() (asserted above): the 16 bytes written are within
        // `out`
        unsafe {
            _mm_storeu_si128(
                out.as_mut_ptr().add(i).cast(),
                _mm256_castsi256_si128(packed),
            )
        };
        i += 4;
        grouped += 4;
    }
    numbers_at(b, starts, out, i);
    grouped
}

/// Bit masks of 64 bytes' classes for `checked_list`: bit k is set iff byte k is one.
#[derive(Default)]
struct Classes {
    digit: u64,
    comma: u64,
    /// JSON whitespace: space, tab, line feed, carriage return
    space: u64,
    zero: u64,
}

#[inline(always)]
fn classify(block: &[u8; 64]) -> Classes {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8, _mm_sub_epi8,
        };
        let mut c = Classes::default();
        for k in 0..4 {
            // SAFETY: SSE2 is enabled (cfg above); the 16 bytes read are within `block`
            // (an unaligned load).
            unsafe {
                let x = _mm_loadu_si128(block.as_ptr().add(16 * k).cast());
                let is = |byte: u8| _mm_cmpeq_epi8(x, _mm_set1_epi8(byte as i8));
                let bits = |m| u64::from(_mm_movemask_epi8(m) as u16) << (16 * k);
                let d = _mm_sub_epi8(x, _mm_set1_epi8(b'0' as i8));
                c.digit |= bits(_mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(9)), d));
                c.comma |= bits(is(b','));
                c.space |= bits(_mm_or_si128(
                    _mm_or_si128(is(b' '), is(b'\n')),
                    _mm_or_si128(is(b'\r'), is(b'\t')),
                ));
                c.zero |= bits(is(b'0'));
            }
        }
        c
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        let mask = |f: fn(u8) -> bool| {
            block
                .iter()
                .enumerate()
                .fold(0u64, |m, (k, &c)| m | (u64::from(f(c)) << k))
        };
        Classes {
            digit: mask(|c| c.is_ascii_digit()),
            comma: mask(|c| c == b','),
            space: mask(|c| matches!(c, b' ' | b'\n' | b'\r' | b'\t')),
            zero: mask(|c| c == b'0'),
        }
    }
}

/// `classify` with AVX2's 32-byte compares.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn classify_avx2(block: &[u8; 64]) -> Classes {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8,
        _mm256_or_si256, _mm256_set1_epi8, _mm256_sub_epi8,
    };
    let mut c = Classes::default();
    for k in 0..2 {
        let x = _mm256_loadu_si256(block.as_ptr().add(32 * k).cast::<__m256i>());
        let d = _mm256_sub_epi8(x, _mm256_set1_epi8(b'0' as i8));
        let digit = _mm256_cmpeq_epi8(_mm256_min_epu8(d, _mm256_set1_epi8(9)), d);
        let comma = _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b',' as i8));
        let space = _mm256_or_si256(
            _mm256_or_si256(
                _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b' ' as i8)),
                _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b'\n' as i8)),
            ),
            _mm256_or_si256(
                _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b'\r' as i8)),
                _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b'\t' as i8)),
            ),
        );
        let zero = _mm256_cmpeq_epi8(x, _mm256_set1_epi8(b'0' as i8));
        let shift = 32 * k;
        c.digit |= u64::from(_mm256_movemask_epi8(digit) as u32) << shift;
        c.comma |= u64::from(_mm256_movemask_epi8(comma) as u32) << shift;
        c.space |= u64::from(_mm256_movemask_epi8(space) as u32) << shift;
        c.zero |= u64::from(_mm256_movemask_epi8(zero) as u32) << shift;
    }
    c
}

/// Bit k is set iff `b[at + k]` is an ASCII digit (`at + 64 <= b.len()`).
#[inline(always)]
fn digit_mask(b: &[u8], at: usize) -> u64 {
    let block: &[u8; 64] = b[at..at + 64].try_into().expect("64 bytes");
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_set1_epi8,
            _mm_sub_epi8,
        };
        let mut mask = 0u64;
        for k in 0..4 {
            // SAFETY: SSE2 is enabled (cfg above); the 16 bytes read are within `block`
            // (an unaligned load).
            unsafe {
                let x = _mm_loadu_si128(block.as_ptr().add(16 * k).cast());
                // byte - '0' is a digit's value, or wraps to >= 10 for anything else
                let d = _mm_sub_epi8(x, _mm_set1_epi8(b'0' as i8));
                let is_digit = _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(9)), d);
                mask |= u64::from(_mm_movemask_epi8(is_digit) as u16) << (16 * k);
            }
        }
        mask
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        block
            .iter()
            .enumerate()
            .fold(0u64, |m, (k, c)| m | (u64::from(c.is_ascii_digit()) << k))
    }
}

/// What the bytes `b[end..at]` between a number (or the list's `[`) and the next digit are.
enum Separator {
    /// One comma and whitespace (after `[`: whitespace only): the number at `at` is next.
    Next,
    /// Whitespace (after a number or `[`) and `]`: the list ended; the index after the `]`.
    Close(usize),
    /// Anything else.
    Bad,
}

#[inline(always)]
fn separator(b: &[u8], end: usize, at: usize, first: bool) -> Separator {
    // json.dumps writes ", ", compact writers ","
    if !first && ((at - end == 2 && b[end..at] == *b", ") || (at - end == 1 && b[end] == b',')) {
        return Separator::Next;
    }
    separator_slow(b, end, at, first)
}

#[inline(never)]
fn separator_slow(b: &[u8], end: usize, at: usize, first: bool) -> Separator {
    let mut j = ws(b, end);
    if b.get(j) == Some(&b']') {
        return Separator::Close(j + 1);
    }
    if !first {
        if b.get(j) != Some(&b',') {
            return Separator::Bad;
        }
        j = ws(b, j + 1);
    }
    if j == at {
        Separator::Next
    } else {
        Separator::Bad
    }
}

/// The number starting at `b[at]` (a digit): its value and digits; None if it is not a JSON
/// integer that fits a u32.
#[inline(always)]
fn number(b: &[u8], at: usize) -> Option<(u32, usize)> {
    swar_number(b, at).or_else(|| scalar_number(b, at))
}

#[inline]
fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// A JSON non-negative integer of 1 to 7 digits at `b[i..]`, read from one 8-byte word:
/// (value, digits). None when fewer than 8 bytes remain, the number has 8 or more digits, or
/// there is no number (or a leading zero) here: `scalar_number` decides those.
#[inline(always)]
fn swar_number(b: &[u8], i: usize) -> Option<(u32, usize)> {
    let w = u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?);
    // byte k of x is the digit's value iff byte k of the input is an ASCII digit (x_k < 10)
    let x = w ^ 0x3030_3030_3030_3030;
    // high bit of byte k set iff x_k >= 10. A carry out of byte k (x_k >= 0x8a) only disturbs
    // bytes above the first non-digit, which are not used.
    let non_digit = (x.wrapping_add(0x7676_7676_7676_7676) | x) & 0x8080_8080_8080_8080;
    if non_digit == 0 {
        return None;
    }
    let n = (non_digit.trailing_zeros() / 8) as usize;
    if n == 0 || (n > 1 && w as u8 == b'0') {
        return None;
    }
    // the n digits, most significant first, moved to the top bytes of an 8-digit number
    let mut v = x << (8 * (8 - n));
    // standard SWAR: pairs, then quads, then the 8 digits
    v = (v.wrapping_mul(10)).wrapping_add(v >> 8);
    v = ((v & 0x0000_00FF_0000_00FF)
        .wrapping_mul(0x000F_4240_0000_0064)
        .wrapping_add(((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(0x0000_2710_0000_0001)))
        >> 32;
    Some((v as u32, n))
}

/// The general case of `swar_number`: up to 10 digits, no leading zero, at most u32::MAX.
#[inline(never)]
fn scalar_number(b: &[u8], i: usize) -> Option<(u32, usize)> {
    let mut j = i;
    let mut v: u64 = 0;
    while j < b.len() && b[j].is_ascii_digit() && j - i < 11 {
        v = v * 10 + (b[j] - b'0') as u64;
        j += 1;
    }
    let digits = j - i;
    if digits == 0 || digits > 10 || (digits > 1 && b[i] == b'0') || v > u32::MAX as u64 {
        return None;
    }
    Some((v as u32, digits))
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

/// A serde_json error's message without its position (which is relative to the inner text).
fn message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(k) if e.line() > 0 => text[..k].to_string(),
        _ => text,
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
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let text = raw.get();
            // JSON's -0 is the integer 0 (as Python reads it); serde_json reads it as a float
            let t = if text == "-0" {
                0
            } else {
                TokenSeed(out.len())
                    .deserialize(&mut serde_json::Deserializer::from_str(text))
                    .map_err(|e| de::Error::custom(message(&e)))?
            };
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

/// `"instance": ["location", n]`
fn write_match(out: &mut String, m: &Match) {
    write_str(out, &m.instance);
    out.push_str(": [");
    write_str(out, &m.location);
    let _ = write!(out, ", {}]", m.length);
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
        write_match(&mut out, m);
    }
    out.push('}');
    // the spec's flat keys repeat layout_info's entries
    for m in matches {
        out.push_str(", ");
        write_match(&mut out, m);
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
            b"{\"x\": \"\xff\", \"tokens\": [1]}",
            b"{\"x\": [\"\xed\xa0\x80\"], \"tokens\": [1]}",
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
    fn minus_zero_is_the_integer_zero_and_other_keys_keep_the_fast_list() {
        assert_eq!(
            parse_lookup_body(br#"{"tokens": [-0, 1, -0]}"#).unwrap(),
            vec![0, 1, 0]
        );
        for bad in [
            &br#"{"tokens": [-0.0]}"#[..],
            br#"{"tokens": [-0e0]}"#,
            br#"{"tokens": [-00]}"#,
        ] {
            assert!(
                parse_lookup_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // other keys, before or after (the list itself is read by `fast_list`)
        assert_eq!(
            parse_lookup_body(b"{\"model\": \"m\", \"tokens\": [1, 22,\n333], \"x\": [{}]}")
                .unwrap(),
            vec![1, 22, 333]
        );
        // errors from the element-wise reading name the element, with the body's position only
        let e = parse_lookup_body(br#"{"a": 1, "tokens": [0, "x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens[1]") && e.contains("a string"), "{e}");
        assert_eq!(e.matches(" at line ").count(), 1, "{e}");
        let e = parse_lookup_body(br#"{"tokens": [1, 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad /lookup body: "), "{e}");
    }

    #[test]
    fn fast_path_agrees_with_full_parser() {
        // (body, taken by the fast path): what it takes it reads as the full parser does; what
        // it leaves is either refused by the full parser or a spelling only the full one reads
        for (body, fast) in [
            (&b"{\"tokens\": [1, 2, 3]}"[..], true),
            (b" {\n\"tokens\" :[ 0 ,4294967295 ] } ", true),
            (b"{\"tokens\": []}", true),
            (b"{\"tokens\": [01]}", false),
            (b"{\"tokens\": [4294967296]}", false),
            (b"{\"tokens\": [1.0]}", false),
            (b"{\"tokens\": [1e2]}", false),
            (b"{\"tokens\": [-0]}", false),
            (b"{\"tokens\": [1,]}", false),
            (b"{\"tokens\": [1] }x", false),
            (b"{\"tokens\": [99999999999]}", false),
        ] {
            let text = String::from_utf8_lossy(body);
            let full = full_parse(body);
            match fast_tokens(body) {
                Some(t) => {
                    assert!(fast, "{text}: taken");
                    assert_eq!(Some(t), full, "{text}");
                }
                None => assert!(!fast, "{text}: left to the full parser"),
            }
        }
        // of those left, only -0 is valid JSON for a token list
        assert_eq!(full_parse(b"{\"tokens\": [-0]}"), Some(vec![0]));
        for refused in [
            &b"{\"tokens\": [01]}"[..],
            b"{\"tokens\": [1.0]}",
            b"{\"tokens\": [1,]}",
        ] {
            assert_eq!(full_parse(refused), None);
        }
    }

    /// The tokens `checked_list` takes, read `chunk` at a time (the last read may be shorter).
    fn checked_tokens(body: &[u8], chunk: usize) -> Option<Vec<u32>> {
        // the 16-byte compares take what the 32-byte ones take, at the same end
        let sse2 = tokens_member(body, |b, i| checked_list_by(b, i, classify));
        let taken = tokens_member(body, checked_list);
        assert_eq!(
            sse2.map(|t| (t.at, t.total)),
            taken.map(|t| (t.at, t.total)),
            "{}",
            String::from_utf8_lossy(body)
        );
        let mut lazy = tokens_member(body, checked_list)?;
        let mut out = Vec::new();
        while lazy.left > 0 {
            let n = chunk.min(lazy.left);
            out.extend_from_slice(lazy.take(n));
        }
        assert_eq!(out.len(), lazy.total);
        Some(out)
    }

    /// `checked_list` takes only what the full parser takes, with the same tokens, read in
    /// chunks of any size; and `parse_lookup_tokens` answers as `parse_lookup_body` does.
    fn assert_checked_agrees(body: &[u8]) {
        let full = full_parse(body);
        for chunk in [1, 3, 64, 256, usize::MAX] {
            if let Some(t) = checked_tokens(body, chunk) {
                assert_eq!(Some(t), full, "{}", String::from_utf8_lossy(body));
            }
        }
        let eager = parse_lookup_body(body).ok();
        let lazy = parse_lookup_tokens(body).ok().map(BodyTokens::into_vec);
        assert_eq!(lazy, eager, "{}", String::from_utf8_lossy(body));
    }

    /// A small deterministic random source: `next(m)` is below `m`.
    fn xorshift(mut state: u64) -> impl FnMut(u64) -> u64 {
        move |m| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        }
    }

    fn full_parse(body: &[u8]) -> Option<Vec<u32>> {
        let mut de = serde_json::Deserializer::from_slice(body);
        de.deserialize_any(BodyVisitor)
            .and_then(|t| de.end().map(|_| t))
            .ok()
            .flatten()
    }

    #[test]
    fn fast_path_every_digit_count_and_position() {
        // numbers of 1..=11 digits, alone, first, last and in the middle, with and without
        // leading zeros, so both the 8-byte and the byte-at-a-time reads meet every length and
        // every distance from the end of the body
        let mut nums: Vec<String> = Vec::new();
        for d in 1..=11usize {
            nums.push("9".repeat(d));
            nums.push(format!("1{}", "0".repeat(d - 1)));
            nums.push(format!("0{}", "7".repeat(d - 1)));
            nums.push(format!("4294967{:0>w$}", "", w = d.saturating_sub(7)));
        }
        nums.push("4294967295".into());
        nums.push("4294967296".into());
        for a in &nums {
            for b in &nums {
                for sep in [",", ", ", " , ", ",\n\t"] {
                    for tail in ["]}", "] }", "]}\n", "]} x", "],}", "]"] {
                        let body = format!("{{\"tokens\": [{a}{sep}{b}{tail}");
                        let fast = fast_tokens(body.as_bytes());
                        let full = full_parse(body.as_bytes());
                        assert_eq!(fast, full, "{body}");
                        assert_checked_agrees(body.as_bytes());
                        // what checked_list leaves to the others: numbers of 10 digits
                        // or more, and whatever is not valid
                        let short = |n: &String| n.len() < 10;
                        if full.is_some() && short(a) && short(b) {
                            assert!(checked_tokens(body.as_bytes(), 256).is_some(), "{body}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn checked_list_edges() {
        let took = |list: &str| checked_tokens(format!("{{\"tokens\": {list}}}").as_bytes(), 2);
        assert_eq!(took("[]"), Some(vec![]));
        assert_eq!(took("[ \n]"), Some(vec![]));
        assert_eq!(took("[0, 10,7 ,\t8]"), Some(vec![0, 10, 7, 8]));
        assert_eq!(took("[999999999]"), Some(vec![999_999_999]));
        for refused in [
            "[,]",
            "[,1]",
            "[1,]",
            "[1 ,]",
            "[1,,2]",
            "[1, ,2]",
            "[1 2]",
            "[01]",
            "[1, 00]",
            "[1.0]",
            "[-0]",
            "[1",
            "[1,",
            "[",
            "[1]x",
            "[1, ,2 3]",
            "[1 2, ,3]",
            "[ ,1 2]",
            "[1 2,]",
            "[1,,2 3]",
        ] {
            assert_eq!(took(refused), None, "{refused}");
        }
        // ten digits or more: valid, but left to fast_list
        assert_eq!(took("[1000000000]"), None);
        assert_eq!(
            parse_lookup_tokens(b"{\"tokens\": [4294967295, 1]}")
                .unwrap()
                .into_vec(),
            vec![u32::MAX, 1]
        );
        // two commas in a row, or with whitespace between, the first on a block's last byte
        // (bytes 13-75 are the first block), where two numbers without a comma between them
        // keep the count of commas right
        let gap = " ".repeat(60);
        assert_eq!(took(&format!("[1 2{gap},,3]")), None);
        assert_eq!(took(&format!("[1 2{gap}, ,3]")), None);
        // a comma last, then a block of whitespace only
        assert_eq!(took(&format!("[1 2,{gap}{gap}]")), None);
        // whitespace runs after a digit or a comma that cross 64-byte blocks
        for pad in 0..130 {
            let gap = " ".repeat(pad);
            assert_eq!(took(&format!("[1{gap}, 2]")), Some(vec![1, 2]), "{pad}");
            assert_eq!(took(&format!("[1,{gap}2]")), Some(vec![1, 2]), "{pad}");
            if pad > 0 {
                assert_eq!(took(&format!("[1{gap}2]")), None, "{pad}");
            }
            assert_eq!(took(&format!("[1,{gap},2]")), None, "{pad}");
            // as many commas as gaps between numbers, but two in one gap
            assert_eq!(took(&format!("[1,{gap},2 3]")), None, "{pad}");
            assert_eq!(took(&format!("[{gap},1 2]")), None, "{pad}");
            assert_eq!(took(&format!("[1,{gap}]")), None, "{pad}");
            assert_eq!(took(&format!("[{gap}1]")), Some(vec![1]), "{pad}");
            assert_eq!(took(&format!("[{gap},1]")), None, "{pad}");
            let zeros = format!("[{gap}0{}]", "1".repeat(pad % 3));
            assert_eq!(took(&zeros), (pad % 3 == 0).then(|| vec![0]), "{zeros}");
            let nines = "9".repeat(pad % 12 + 1);
            let value = nines.parse::<u64>().unwrap();
            assert_eq!(
                took(&format!("[{gap}{nines}]")),
                (value < 1_000_000_000).then(|| vec![value as u32]),
                "{gap}{nines}"
            );
        }
    }

    #[test]
    fn classify_marks_every_byte_value_at_every_position() {
        for value in 0..=255u8 {
            for pos in 0..64 {
                let mut block = [b'7'; 64];
                block[pos] = value;
                let mask = |f: fn(u8) -> bool| {
                    (0..64).fold(0u64, |m, k| m | (u64::from(f(block[k])) << k))
                };
                let expected = (
                    mask(|c| c.is_ascii_digit()),
                    mask(|c| c == b','),
                    mask(|c| matches!(c, b' ' | b'\n' | b'\r' | b'\t')),
                    mask(|c| c == b'0'),
                );
                let got = |c: Classes| (c.digit, c.comma, c.space, c.zero);
                assert_eq!(got(classify(&block)), expected, "byte {value:#x} at {pos}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2 (checked just above)
                    let avx2 = unsafe { classify_avx2(&block) };
                    assert_eq!(got(avx2), expected, "byte {value:#x} at {pos}");
                }
            }
        }
    }

    #[test]
    fn digit_mask_marks_the_digits_of_every_byte_value_at_every_position() {
        for value in 0..=255u8 {
            for pos in 0..64 {
                let mut b = vec![b'7'; 70];
                b[3 + pos] = value;
                let expected =
                    (0..64).fold(0u64, |m, k| m | (u64::from(b[3 + k].is_ascii_digit()) << k));
                assert_eq!(digit_mask(&b, 3), expected, "byte {value:#x} at {pos}");
            }
        }
    }

    #[test]
    fn numbers_of_every_length_in_every_place_of_a_group_of_four() {
        // 1 to 9 digits (8 and 9 need more than the group's 8-byte words) in each of the four
        // lanes of a group, the rest 1 to 7 digits; the lists end right after the group or a
        // few numbers later, so groups meet the end of the body (no 8-byte word left there);
        // read in chunks of every size that splits groups differently
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for digits in 1..=9u32 {
            for lane in 0..4 {
                for (lead, trail) in [(0, 0), (4, 0), (5, 3), (66, 1), (63, 2)] {
                    let mut nums: Vec<u64> = (0..lead + 4 + trail)
                        .map(|_| {
                            let d = 1 + next(7) as u32;
                            next(10u64.pow(d))
                        })
                        .collect();
                    let low = 10u64.pow(digits - 1);
                    nums[lead + lane] = low + next(9 * low);
                    for sep in [",", ", ", ",\n "] {
                        let list: Vec<String> = nums.iter().map(u64::to_string).collect();
                        let body = format!("{{\"tokens\": [{}]}}", list.join(sep));
                        let want: Vec<u32> = nums.iter().map(|&v| v as u32).collect();
                        for chunk in 1..=9 {
                            assert_eq!(
                                checked_tokens(body.as_bytes(), chunk).as_ref(),
                                Some(&want),
                                "{body} in chunks of {chunk}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn number_starts_and_both_readers_agree_with_a_byte_at_a_time_scan() {
        let mut next = xorshift(0x853c_49e6_748f_ea9bu64);
        for round in 0..200 {
            let count = 1 + next(300) as usize;
            let nums: Vec<u32> = (0..count)
                .map(|_| {
                    let d = 1 + next(if round % 2 == 0 { 6 } else { 9 }) as u32;
                    next(10u64.pow(d)) as u32
                })
                .collect();
            let list: Vec<String> = nums.iter().map(u32::to_string).collect();
            let sep = [",", ", ", " ,\t", ",\r\n    "][round % 4];
            let body = format!("[{}]", list.join(sep)).into_bytes();
            let mut expected_starts = Vec::new();
            for i in 1..body.len() {
                if body[i].is_ascii_digit() && !body[i - 1].is_ascii_digit() {
                    expected_starts.push(i);
                }
            }
            let mut starts = Vec::new();
            number_starts(&body, 1, count, &mut starts);
            assert_eq!(
                &starts[..count],
                &expected_starts[..],
                "{}",
                String::from_utf8_lossy(&body)
            );
            let mut one_at_a_time = vec![0u32; count];
            let end = numbers_at(&body, &starts[..count], &mut one_at_a_time, 0);
            assert_eq!(one_at_a_time, nums);
            assert_eq!(body[end], b']');
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut grouped = vec![0u32; count];
                // SAFETY: this CPU has AVX2 (checked just above)
                let four_at_a_time =
                    unsafe { numbers_at_avx2(&body, &starts[..count], &mut grouped) };
                assert_eq!(grouped, nums, "{}", String::from_utf8_lossy(&body));
                // every group of numbers under 8 digits is read four at a time, also after a
                // group with a longer one, except those in the body's last 8 bytes
                let short_groups = nums
                    .chunks_exact(4)
                    .filter(|g| g.iter().all(|&v| v < 10_000_000))
                    .count();
                assert!(
                    four_at_a_time + 8 >= 4 * short_groups && four_at_a_time <= 4 * short_groups,
                    "{four_at_a_time} of {short_groups} short groups: {}",
                    String::from_utf8_lossy(&body)
                );
            } else {
                eprintln!("no AVX2 here: numbers_at_avx2 not tested");
            }
            let mut out = vec![0u32; count];
            assert_eq!(read_numbers(&body, 1, &mut out, &mut starts), end);
            assert_eq!(out, nums);
        }
    }

    #[test]
    fn long_lists_with_any_byte_changed_read_as_the_full_parser() {
        // long enough for the 64-byte digit masks, with numbers across block boundaries, of
        // 1 to 10 digits (some over u32::MAX), each separator spelling, and lists that end in
        // the last bytes or well inside the whole blocks, followed by other keys with digits;
        // then every byte replaced by each of a few that change the grammar
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let digits_after = format!(
            ", \"n\": [{}], \"m\": \"a1\"}}",
            (0..40)
                .map(|k| (k * 37).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (count, after) in [
            (40, "}"),
            (61, ", \"m\": \"a1\"}"),
            (70, " }\n"),
            (17, "}"),
            (30, digits_after.as_str()),
        ] {
            for wide in [false, true] {
                let mut list = String::new();
                for k in 0..count {
                    if k > 0 {
                        list.push_str([",", ", ", " ,", ",\n  ", "\t, "][next(5) as usize]);
                    }
                    let digits = 1 + next(if wide { 10 } else { 7 }) as u32;
                    list.push_str(&next(10u64.pow(digits)).to_string());
                }
                let body = format!("{{\"tokens\": [{list}]{after}");
                let bytes = body.as_bytes();
                assert_eq!(fast_tokens(bytes), full_parse(bytes), "{body}");
                if !wide {
                    assert!(fast_tokens(bytes).is_some(), "{body}");
                    assert_eq!(checked_tokens(bytes, 16), fast_tokens(bytes), "{body}");
                }
                for pos in 0..bytes.len() {
                    for c in [
                        b',', b' ', b']', b'[', b'-', b'0', b'9', b'a', b'\n', b'\t', b'\r', 0x0b,
                        0x0c, 0x80, 0xff, b'"', b'.', b'}',
                    ] {
                        let mut changed = bytes.to_vec();
                        changed[pos] = c;
                        if let Some(t) = fast_tokens(&changed) {
                            assert_eq!(
                                Some(t),
                                full_parse(&changed),
                                "{}",
                                String::from_utf8_lossy(&changed)
                            );
                        }
                        assert_checked_agrees(&changed);
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn other_keys_path_matches_full_parser(
            vals in proptest::collection::vec(0u64..5_000_000_000, 0..30),
            keys in proptest::collection::vec((0usize..10, 0usize..8), 0..5),
            at in 0usize..6,
            space in 0usize..3,
            flip in proptest::option::of((0usize..600, 0u8..=255)),
        ) {
            const KEYS: [&str; 10] = ["\"model\"", "\"tokens\"", "\"tok\\u0065ns\"", "\"\\\"\"", "\"detail\"",
                "\"\u{e9}\"", "\"x\"", "1", "\"tokens \"", "\"\""];
            const VALUES: [&str; 8] = ["1", "-0.5e3", "\"s,}]\"", "[1, [2, {\"a\": null}]]", "{\"tokens\": [1]}",
                "true", "[-0]", "\"\\ud83d\\ude00\""];
            let sp = [" ", "", "\n\t "][space];
            let list = vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(&format!(",{sp}"));
            let mut members: Vec<String> = keys.iter().map(|&(k, v)| format!("{}{sp}:{sp}{}", KEYS[k], VALUES[v])).collect();
            members.insert(at.min(members.len()), format!("\"tokens\":{sp}[{list}]"));
            let body = format!("{sp}{{{sp}{}{sp}}}{sp}", members.join(&format!("{sp},{sp}")));
            let mut bytes = body.into_bytes();
            let check = |bytes: &[u8]| -> Result<(), proptest::test_runner::TestCaseError> {
                if let Some(t) = fast_tokens(bytes) {
                    // full_parse skips values without checking their UTF-8: check it here
                    proptest::prop_assert!(std::str::from_utf8(bytes).is_ok());
                    proptest::prop_assert_eq!(Some(t), full_parse(bytes));
                }
                Ok(())
            };
            // well formed: taken whenever it has one "tokens" (as the decoded key) of plain values
            let full = full_parse(&bytes);
            let tokens_keys = keys.iter().filter(|&&(k, _)| k == 1 || k == 2).count();
            if tokens_keys == 0 && vals.iter().all(|&v| v <= u32::MAX as u64) && !keys.iter().any(|&(k, _)| k == 7) {
                proptest::prop_assert!(full.is_some());
                proptest::prop_assert_eq!(fast_tokens(&bytes), full);
            }
            check(&bytes)?;
            assert_checked_agrees(&bytes);
            // damaged: whatever it takes, the full parser reads the same
            if let Some((pos, byte)) = flip {
                if pos < bytes.len() {
                    bytes[pos] = byte;
                }
            }
            check(&bytes)?;
            assert_checked_agrees(&bytes);
        }

        #[test]
        fn fast_list_takes_every_valid_list_of_small_numbers(
            vals in proptest::collection::vec(0u64..6_000_000_000, 0..200),
            small in proptest::bool::ANY,
            seps in proptest::collection::vec(0usize..5, 200),
            pad in (0usize..3, 0usize..3),
            flip in proptest::option::of((0usize..3000, 0u8..=255)),
        ) {
            const SEPS: [&str; 5] = [",", ", ", " ,", " , ", ",    "];
            const PADS: [&str; 3] = ["", " ", "\n  "];
            let vals: Vec<u64> = if small { vals.iter().map(|v| v % 100).collect() } else { vals };
            let mut list = String::from(PADS[pad.0]);
            for (k, v) in vals.iter().enumerate() {
                if k > 0 {
                    list.push_str(SEPS[seps[k]]);
                }
                list.push_str(&v.to_string());
            }
            list.push_str(PADS[pad.1]);
            let mut bytes = format!("{{\"tokens\": [{list}]}}").into_bytes();
            let at = bytes.iter().position(|&c| c == b'[').unwrap();
            let full = full_parse(&bytes);
            let fast = fast_list(&bytes, at).map(|(t, _)| t);
            // the checked list takes every valid list of numbers under 10 digits
            if vals.iter().all(|&v| v < 1_000_000_000) {
                proptest::prop_assert_eq!(&checked_tokens(&bytes, 7), &full);
            }
            assert_checked_agrees(&bytes);
            // valid: the fast reader takes it (whatever whitespace follows a comma) and agrees
            if vals.iter().all(|&v| v <= u32::MAX as u64) {
                proptest::prop_assert_eq!(&fast, &full);
            } else {
                proptest::prop_assert_eq!(fast, None);
            }
            // damaged: whatever it takes, the full parser reads the same
            if let Some((pos, byte)) = flip {
                if pos < bytes.len() {
                    bytes[pos] = byte;
                }
            }
            assert_checked_agrees(&bytes);
            if let Some((t, end)) = fast_list(&bytes, at) {
                // framed as fast_tokens frames it: the same prefix, then only "}" and whitespace
                let close = ws(&bytes, end);
                if bytes.starts_with(b"{\"tokens\": [") && bytes.get(close) == Some(&b'}')
                    && ws(&bytes, close + 1) == bytes.len() {
                    proptest::prop_assert_eq!(Some(t), full_parse(&bytes));
                }
            }
        }

        #[test]
        fn fast_path_matches_full_parser(
            vals in proptest::collection::vec(0u64..6_000_000_000, 0..40),
            seps in proptest::collection::vec(0usize..6, 40),
            cut in 0usize..400,
            flip in proptest::option::of((0usize..400, 0u8..=255)),
        ) {
            const SEPS: [&str; 6] = [",", ", ", " ,", ",\n  ", "\t,\t", ",                                                                        "];
            let mut body = String::from("{\"tokens\": [");
            for (k, v) in vals.iter().enumerate() {
                if k > 0 {
                    body.push_str(SEPS[seps[k]]);
                }
                body.push_str(&v.to_string());
            }
            body.push_str("]}");
            let mut bytes = body.into_bytes();
            let fast = fast_tokens(&bytes);
            let full = full_parse(&bytes);
            // a well-formed body: both agree, and the fast path takes it whenever it is valid
            proptest::prop_assert_eq!(&fast, &full);
            assert_checked_agrees(&bytes);
            // damaged bodies: whatever the fast path accepts, the full parser accepts the same
            if let Some((at, byte)) = flip {
                if at < bytes.len() {
                    bytes[at] = byte;
                }
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 4));
            assert_checked_agrees(&bytes);
            if let Some(t) = fast_tokens(&bytes) {
                proptest::prop_assert_eq!(Some(t), full_parse(&bytes));
            }
        }
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\n\u{1}é😀");
        assert_eq!(s, r#""a\"b\\c\n\u0001\u00e9\ud83d\ude00""#);
    }

    const NAMES: [&str; 3] = ["model", "lora_name", "cache_salt"];

    #[test]
    fn names_any_reads_the_usual_bodies_without_their_lists() {
        let list = format!(
            "[{}]",
            (0..5000)
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for (body, named) in [
            (format!("{{\"tokens\": {list}}}"), false),
            (format!("{{\"model\": \"m\", \"tokens\": {list}}}"), true),
            (
                format!("{{\"tokens\": {list}, \"cache_salt\": \"s\"}}"),
                true,
            ),
            (
                format!("{{\"model\": null, \"lora_name\": null, \"tokens\": {list}}}"),
                false,
            ),
            (
                format!("{{\"tokens\": {list}, \"\\u006dodel\": \"m\"}}"),
                true,
            ),
            (
                format!("{{\"modelx\": 1, \"tokens\": {list}, \"x\": {{\"model\": 1}}}}"),
                false,
            ),
            (format!("{{\"model\": 5, \"tokens\": {list}}}"), true),
            (
                format!("{{\"model\": \"m\", \"model\": null, \"tokens\": {list}}}"),
                true,
            ),
        ] {
            let b = body.as_bytes();
            assert_eq!(
                names_any_skimmed(b, &NAMES),
                Some(named),
                "{}",
                &body[..60.min(body.len())]
            );
            assert_eq!(names_any_parsed(b, &NAMES), named);
        }
        // what the skim does not follow, the full parse decides
        for (body, named) in [
            ("{\"tokens\": [1, \"]\", 2], \"model\": \"m\"}", true),
            ("{\"tokens\": [[1], 2], \"model\": \"m\"}", true),
            ("{\"tokens\": [1, 2], \"model\": \"m\"} x", false),
            ("[{\"model\": \"m\"}]", false),
            ("{\"tokens\": [1, 2], \"model\": \"m\"", false),
            ("", false),
        ] {
            assert_eq!(names_any(body.as_bytes(), &NAMES), named, "{body}");
        }
        assert!(!names_any(b"{\"model\": \"m\"}", &[]));
        assert!(names_any(b"{\"tokens\": [1, 2]}", &["tokens"]));
        assert!(!names_any(b"{\"tokens\": null}", &["tokens"]));
    }

    #[test]
    fn names_any_skim_agrees_with_the_full_parse() {
        // bodies from pieces (keys, values, lists with strings and inner lists in them, stray
        // brackets and quotes), and each with one byte cut off or doubled: wherever the skim
        // answers for a JSON body, the full parse answers the same
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let keys = [
            "\"tokens\"",
            "\"model\"",
            "\"lora_name\"",
            "\"cache_salt\"",
            "\"x\"",
            "\"mod\\u0065l\"",
        ];
        let values = [
            "null",
            "\"m\"",
            "\"]\"",
            "5",
            "[1, 2, 3]",
            "[1, \"]\", 2]",
            "[[1], 2]",
            "{\"model\": \"m\"}",
            "[]",
            "\"a\\\"b\"",
            "[1,\n 2 ]",
            "true",
        ];
        for _ in 0..20_000 {
            let mut body = String::from("{");
            for m in 0..next(4) {
                if m > 0 {
                    body.push_str([",", " , "][next(2) as usize]);
                }
                body.push_str(keys[next(keys.len() as u64) as usize]);
                body.push_str([":", " : "][next(2) as usize]);
                body.push_str(values[next(values.len() as u64) as usize]);
            }
            body.push('}');
            let mut bodies = vec![body.clone().into_bytes()];
            let at = next(body.len() as u64) as usize;
            let mut cut = body.clone().into_bytes();
            cut.remove(at);
            let mut doubled = body.into_bytes();
            doubled.insert(at, doubled[at]);
            bodies.extend([cut, doubled]);
            for b in &bodies {
                // (a body that is not JSON is refused by the lookup whatever it names)
                let json = serde_json::from_slice::<IgnoredAny>(b).is_ok();
                if let (true, Some(found)) = (json, names_any_skimmed(b, &NAMES)) {
                    assert_eq!(
                        found,
                        names_any_parsed(b, &NAMES),
                        "{}",
                        String::from_utf8_lossy(b)
                    );
                }
            }
        }
    }
}
