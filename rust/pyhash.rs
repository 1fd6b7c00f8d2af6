//! CPython's builtin `hash()` for the values LMCache's chunk keys are made of: ints, tuples and
//! strs, and the chain LMCache 0.5 builds from them (see README.md, "Key spaces").
//!
//! Workers that hash with `hash()` report keys as signed `Py_hash_t` values. Reproducing them here
//! lets the index answer `/lookup` for such workers without running Python per chunk.
//! Every constant and rule below is checked against real interpreters by the tests in this file
//! (vectors printed by CPython 3.10-3.13) and by tests/test_lmcache_hash.py.

use crate::hash::TokenCursor;

/// The modulus of CPython's numeric hash on 64-bit builds (`_PyHASH_MODULUS`, 2^61 - 1).
pub const MODULUS: u64 = (1 << 61) - 1;

// xxHash-derived primes of CPython's tuple hash (Objects/tupleobject.c, 3.8 and later).
const XXPRIME_1: u64 = 11400714785074694791;
const XXPRIME_2: u64 = 14029467366897019727;
const XXPRIME_5: u64 = 2870177450012600261;

/// `hash(x)` for an int that fits in 64 bits: x mod (2^61 - 1), with the sign of x.
#[inline]
pub fn hash_int(x: i64) -> i64 {
    // unsigned_abs: i64::MIN has no positive i64 counterpart
    let r = (x.unsigned_abs() % MODULUS) as i64;
    let h = if x < 0 { -r } else { r };
    // -1 is CPython's error return, so no hash is ever -1
    if h == -1 {
        -2
    } else {
        h
    }
}

/// The running state of CPython's tuple hash over item hashes ("lanes").
#[derive(Clone, Copy)]
pub struct TupleHasher {
    acc: u64,
    len: u64,
}

impl TupleHasher {
    #[inline]
    pub fn new() -> Self {
        TupleHasher {
            acc: XXPRIME_5,
            len: 0,
        }
    }

    /// Feed the hash of the next item.
    #[inline(always)]
    pub fn lane(&mut self, lane: i64) {
        self.acc = self.acc.wrapping_add((lane as u64).wrapping_mul(XXPRIME_2));
        self.acc = self.acc.rotate_left(31);
        self.acc = self.acc.wrapping_mul(XXPRIME_1);
        self.len += 1;
    }

    #[inline]
    pub fn finish(self) -> i64 {
        // the length is mixed in so that hash(()) keeps its pre-3.8 value
        let acc = self.acc.wrapping_add(self.len ^ (XXPRIME_5 ^ 3527539));
        if acc == u64::MAX {
            1546275796
        } else {
            acc as i64
        }
    }
}

impl Default for TupleHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// `hash(tuple(items))` for a tuple of 64-bit ints.
pub fn hash_int_tuple(items: &[i64]) -> i64 {
    let mut t = TupleHasher::new();
    for &x in items {
        t.lane(hash_int(x));
    }
    t.finish()
}

/// `hash(tuple(tokens))`. A token (< 2^32 < 2^61 - 1, never -1) is its own hash.
#[inline]
pub fn hash_token_tuple(tokens: &[u32]) -> i64 {
    let mut t = TupleHasher::new();
    for &x in tokens {
        t.lane(x as i64);
    }
    t.finish()
}

/// `hash(())`.
pub const EMPTY_TUPLE_HASH: i64 = 5740354900026072187;

/// LMCache's chunk key: `hash((prev, tuple(chunk), ()))`.
#[inline]
pub fn lmcache_chunk_key(prev: i64, chunk: &[u32]) -> i64 {
    let mut t = TupleHasher::new();
    t.lane(hash_int(prev));
    t.lane(hash_token_tuple(chunk));
    t.lane(EMPTY_TUPLE_HASH);
    t.finish()
}

/// Lazily yields LMCache's chain of keys over `tokens`: `key[-1] = none_hash`,
/// `key[i] = hash((key[i-1], tuple(chunk_i), ()))`, the final partial chunk included. Keys come
/// out as the two's-complement bit pattern of the signed hash, the form the index stores.
pub struct LmcacheHasher<T> {
    tokens: T,
    chunk_size: usize,
    prev: i64,
}

impl<T: TokenCursor> LmcacheHasher<T> {
    pub fn new(tokens: T, chunk_size: usize, none_hash: i64) -> Self {
        LmcacheHasher {
            tokens,
            chunk_size: chunk_size.max(1),
            prev: none_hash,
        }
    }

    /// Number of tokens in the chunk the next call to `next` hashes (0 when done).
    #[inline]
    pub fn next_len(&self) -> usize {
        self.tokens.remaining().min(self.chunk_size)
    }
}

impl<T: TokenCursor> Iterator for LmcacheHasher<T> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        let n = self.next_len();
        if n == 0 {
            return None;
        }
        let chunk = self.tokens.take(n);
        self.prev = lmcache_chunk_key(self.prev, chunk);
        Some(self.prev as u64)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.tokens.remaining().div_ceil(self.chunk_size);
        (n, Some(n))
    }
}

/// LMCache's keys of `tokens` as Python gives them (signed).
pub fn lmcache_chunk_hashes(tokens: &[u32], chunk_size: usize, none_hash: i64) -> Vec<i64> {
    LmcacheHasher::new(tokens, chunk_size, none_hash)
        .map(|k| k as i64)
        .collect()
}

// ---- str ------------------------------------------------------------------------------------

/// Which SipHash CPython's str hash uses: SipHash-1-3 from 3.11 on, SipHash-2-4 before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SipRounds {
    Sip13,
    Sip24,
}

impl SipRounds {
    fn counts(self) -> (usize, usize) {
        match self {
            SipRounds::Sip13 => (1, 3),
            SipRounds::Sip24 => (2, 4),
        }
    }
}

/// The 24-byte `_Py_HashSecret` for `PYTHONHASHSEED=seed`: all zero for 0, else CPython's
/// linear congruential generator seeded with `seed` (Python/bootstrap_hash.c).
pub fn hash_secret(seed: u32) -> [u8; 24] {
    let mut out = [0u8; 24];
    if seed == 0 {
        return out;
    }
    let mut x = seed;
    for b in out.iter_mut() {
        x = x.wrapping_mul(214013).wrapping_add(2531011);
        *b = (x >> 16) as u8;
    }
    out
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash (64-bit output) of `data` with key (k0, k1).
pub fn siphash(rounds: SipRounds, k0: u64, k1: u64, data: &[u8]) -> u64 {
    let (c, d) = rounds.counts();
    let mut v = [
        k0 ^ 0x736f6d6570736575,
        k1 ^ 0x646f72616e646f6d,
        k0 ^ 0x6c7967656e657261,
        k1 ^ 0x7465646279746573,
    ];
    let mut words = data.chunks_exact(8);
    for w in words.by_ref() {
        let m = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        v[3] ^= m;
        for _ in 0..c {
            sip_round(&mut v);
        }
        v[0] ^= m;
    }
    let mut last = (data.len() as u64) << 56;
    for (i, b) in words.remainder().iter().enumerate() {
        last |= (*b as u64) << (8 * i);
    }
    v[3] ^= last;
    for _ in 0..c {
        sip_round(&mut v);
    }
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..d {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The bytes CPython hashes for a str: its code points in the narrowest of its storage kinds
/// (1 byte each if all are < 256, else 2 if all are < 65536, else 4), little-endian.
fn str_storage(text: &str) -> Vec<u8> {
    let max = text.chars().map(u32::from).max().unwrap_or(0);
    let width = match max {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    };
    let mut out = Vec::with_capacity(text.len() * width);
    for c in text.chars() {
        out.extend_from_slice(&u32::from(c).to_le_bytes()[..width]);
    }
    out
}

/// `hash(text)` on a 64-bit little-endian CPython started with `PYTHONHASHSEED=hash_seed`,
/// whose str hash is `rounds` (the build default: SipHash-1-3 on 3.11+, SipHash-2-4 on 3.10).
pub fn hash_str(text: &str, hash_seed: u32, rounds: SipRounds) -> i64 {
    if text.is_empty() {
        return 0;
    }
    let secret = hash_secret(hash_seed);
    let k0 = u64::from_le_bytes(secret[..8].try_into().expect("8 bytes"));
    let k1 = u64::from_le_bytes(secret[8..16].try_into().expect("8 bytes"));
    let h = siphash(rounds, k0, k1, &str_storage(text)) as i64;
    if h == -1 {
        -2
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors printed by CPython 3.10.13, 3.11.7, 3.12.1 and 3.13.0 (ints and tuples agree on
    // all of them), e.g. `python3 -c 'print(hash(-2**63))'`.

    #[test]
    fn ints() {
        let p = MODULUS as i64;
        let cases: [(i64, i64); 16] = [
            (0, 0),
            (1, 1),
            (-1, -2),
            (-2, -2),
            (p - 1, 2305843009213693950),
            (p, 0),
            (p + 1, 1),
            (-p, 0),
            (-p - 1, -2),
            (1 << 62, 2),
            (i64::MAX, 3),
            (i64::MIN, -4),
            (12345678901234567, 12345678901234567),
            (-98765432109876543, -98765432109876543),
            (-3, -3),
            (u32::MAX as i64, 4294967295),
        ];
        for (x, want) in cases {
            assert_eq!(hash_int(x), want, "hash({x})");
        }
    }

    #[test]
    fn tuples() {
        assert_eq!(hash_int_tuple(&[]), 5740354900026072187);
        assert_eq!(EMPTY_TUPLE_HASH, hash_int_tuple(&[]));
        assert_eq!(hash_int_tuple(&[1]), -6644214454873602895);
        assert_eq!(hash_int_tuple(&[-1]), 8078679518589016365);
        assert_eq!(hash_int_tuple(&[0]), -8753497827991233192);
        assert_eq!(hash_token_tuple(&[1, 2, 3, 4]), 590899387183067792);
        let r: Vec<u32> = (0..300).collect();
        assert_eq!(hash_token_tuple(&r), -6334141629970259144);
    }

    #[test]
    fn chunk_keys() {
        // hash((prev, (1, 2, 3, 4), ())), hash((prev, (), ())), hash((prev, (2**32-1, 0), ()))
        let cases: [(i64, [i64; 3]); 7] = [
            (
                0,
                [
                    4965923915475442220,
                    9096108955250143618,
                    7001678820198124835,
                ],
            ),
            (
                -1,
                [
                    -2196269455274146220,
                    -2464441798483812950,
                    6841842851538863058,
                ],
            ),
            (
                i64::MAX,
                [
                    2908440319096812298,
                    -3090307221920677134,
                    -7832409262623184614,
                ],
            ),
            (
                i64::MIN,
                [
                    2116064136740439360,
                    1847891793530772630,
                    -8624785444979557552,
                ],
            ),
            (
                -5,
                [
                    -138785858895516298,
                    3991399180879185100,
                    1896969045827166317,
                ],
            ),
            (
                MODULUS as i64,
                [
                    4965923915475442220,
                    9096108955250143618,
                    7001678820198124835,
                ],
            ),
            (
                1234567890123456789,
                [
                    4893071914028659558,
                    -4596167359724727363,
                    -5847777667691337354,
                ],
            ),
        ];
        for (prev, want) in cases {
            assert_eq!(
                lmcache_chunk_key(prev, &[1, 2, 3, 4]),
                want[0],
                "prev {prev}"
            );
            assert_eq!(lmcache_chunk_key(prev, &[]), want[1], "prev {prev}");
            assert_eq!(
                lmcache_chunk_key(prev, &[u32::MAX, 0]),
                want[2],
                "prev {prev}"
            );
        }
        // hash(-1) == hash(-2): so are the keys chained on them
        assert_eq!(lmcache_chunk_key(-2, &[1, 2, 3, 4]), -2196269455274146220);
    }

    /// The vector documented in README.md.
    #[test]
    fn documented_chain() {
        let tokens: Vec<u32> = (1..=10).collect();
        assert_eq!(
            lmcache_chunk_hashes(&tokens, 4, 0),
            [
                4965923915475442220,
                -6292915440479534054,
                -4729132277562516714
            ]
        );
        assert_eq!(
            lmcache_chunk_hashes(&tokens, 4, -7),
            [
                -7300979229645104738,
                1018569399587369011,
                1528685510177700188
            ]
        );
        let mut h = LmcacheHasher::new(&tokens[..], 4, 0);
        assert_eq!(h.size_hint(), (3, Some(3)));
        assert_eq!(h.next_len(), 4);
        assert_eq!(h.next(), Some(4965923915475442220));
        assert!(lmcache_chunk_hashes(&[], 4, 0).is_empty());
    }

    const STRS: [&str; 12] = [
        "",
        "0",
        "123",
        "4294967295",
        "vllm-none-hash",
        "a",
        "abcdefgh",
        "abcdefghi",
        "caf\u{e9} \u{ff}",
        "\u{101}\u{20ac}-ucs2",
        "emoji \u{1F600}!",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ];

    fn check_strs(rounds: SipRounds, seed: u32, want: [i64; 12]) {
        assert_eq!(STRS[11].len(), 100);
        for (s, w) in STRS.iter().zip(want) {
            assert_eq!(hash_str(s, seed, rounds), w, "{rounds:?} seed {seed} {s:?}");
        }
    }

    /// `PYTHONHASHSEED=n python3.11 -c 'print(hash(s))'`.
    #[test]
    fn strs_siphash13() {
        let r = SipRounds::Sip13;
        #[rustfmt::skip]
        check_strs(r, 0, [0, 5313149338359954478, -720260156515788369, -7395580164763800411,
            8586095329078945837, 4644417185603328019, 4574395652268504554, -532774252720507163,
            7461538377582530666, -7489740916544477452, 1434056577526124791, 1359644457043326220]);
        #[rustfmt::skip]
        check_strs(r, 1, [0, -8730965283136228465, 2322596916611965022, -2743031991004868044,
            -4418330903588448041, -3012895188637184397, -202642195356325900, 7871229953815684364,
            585839215205385033, 3139434206634046369, 2389290702462753760, 8959034462456271562]);
        #[rustfmt::skip]
        check_strs(r, 123, [0, -2306881544865872834, -6197052367682486848, 189356222457425914,
            6179511450417565581, -4226623170815027173, -26574430599374517, 3094133784285360804,
            -5257534603873781440, -3393626886232307623, 1495808264826306185, -9140949444913829592]);
        #[rustfmt::skip]
        check_strs(r, u32::MAX, [0, -7823853590095853671, 6847585071713501224, 8891781246207573802,
            -5654930642261103510, -5989683813037840249, 3424456984880118976, 6340115119033867570,
            2466739548676911976, 1425144125282611507, 7113398771516526344, 2424569201148640282]);
    }

    /// `PYTHONHASHSEED=n python3.10 -c 'print(hash(s))'`.
    #[test]
    fn strs_siphash24() {
        let r = SipRounds::Sip24;
        #[rustfmt::skip]
        check_strs(r, 0, [0, -5282990986457227702, -8431602076339693759, 6101001965811422186,
            -5612315503169334425, -7583489610679606711, -1847705707669741165, 5991824118181275020,
            -6959381314706005959, -5813727892022296903, -8426129707247412437, -996151759214403962]);
        #[rustfmt::skip]
        check_strs(r, 1, [0, 4618705440803166078, 8874197587556847498, 7967148650303788911,
            9188500758491303964, 8432517439229126278, 2079372463862078453, -8132283223543215011,
            4813086233633929299, 5395671302302135121, -2899684161053250537, 6034933993651046694]);
        #[rustfmt::skip]
        check_strs(r, 123, [0, -3273573490067248490, 5058693379651968498, 6774566408285722273,
            7537266323527112598, -1423242100121843368, -4461512654903851160, 2454875947182892717,
            6097256533503636079, 2268006470817926710, -3092444725756060197, -8488050752986314110]);
        #[rustfmt::skip]
        check_strs(r, u32::MAX, [0, 4699091627405775840, -8385346040060649066, 1316276432756982720,
            -8414780943778206321, -5674455067594467595, 36843754083643386, 1525005572828213490,
            -7932709045309177339, -6642146519164008101, -1903954753704138852, 4794827475745284547]);
    }

    #[test]
    fn secret() {
        assert_eq!(hash_secret(0), [0; 24]);
        // first LCG step from 1: 214013 + 2531011 = 2745024 -> (>> 16) & 0xff = 41
        assert_eq!(hash_secret(1)[0], 41);
    }
}
