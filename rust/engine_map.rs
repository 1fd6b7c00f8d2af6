//! One engine's blocks: the engine's block hash -> (namespace number, our key, locations).
//!
//! Engines name blocks by their own hashes; lookups come with tokens. A stored block's tokens
//! are re-hashed into our chain (continuing after its parent's key) and the map remembers the
//! pair, so removes and token-less tier updates, which carry engine hashes only, resolve to
//! our keys. Every change becomes index operations, grouped per namespace (`take_pending`),
//! merged as they come (admitting `[a]` then `[b]` at one location is admitting `[a, b]`).
//! What cannot be applied is counted by reason (`Counts`), never guessed.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use crate::hash::ChunkHasher;
use crate::holders::FxMap;

/// An engine's block hash: an integer (vLLM, SGLang: i64 or u64 range) or a digest's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EngineHash {
    Int(u64),
    Neg(i64),
    Bytes(Box<[u8]>),
}

impl EngineHash {
    /// `v` in i64..=u64 range (what msgpack carries); one form per value.
    pub fn from_int(v: i128) -> Self {
        if v >= 0 {
            EngineHash::Int(v as u64)
        } else {
            EngineHash::Neg(v as i64)
        }
    }
}

/// Engine media -> our location names (keys compared upper-cased): the table of
/// engine_blocks.py. A medium not listed keeps its own name, never counted as a faster tier.
const MEDIUM_LOCATIONS: [(&str, &str); 15] = [
    ("GPU", "GPU"),
    ("DEVICE", "GPU"),
    ("CUDA", "GPU"),
    ("CPU", "LocalCPUBackend"),
    ("CPU_PINNED", "LocalCPUBackend"),
    ("CPU_TIER1", "LocalCPUBackend"),
    ("LMCACHE-L1", "LocalCPUBackend"),
    ("LOCALCPUBACKEND", "LocalCPUBackend"),
    ("STORAGE", "LocalDiskBackend"),
    ("DISK", "LocalDiskBackend"),
    ("NVME", "LocalDiskBackend"),
    ("FS", "LocalDiskBackend"),
    ("CPU_TIER2", "LocalDiskBackend"),
    ("LOCALDISKBACKEND", "LocalDiskBackend"),
    ("UNKNOWN-MEDIUM", "unknown-medium"),
];
const DEFAULT_LOCATION: &str = "GPU";
const MAX_LOCATION_CHARS: usize = 64;

/// The location of an ASCII medium name (`None`: vLLM before 0.11, whose only publisher is
/// the GPU pool). Non-ASCII names are the Python side's (its case and printability rules).
pub fn location_of(medium: Option<&str>) -> Arc<str> {
    let Some(m) = medium else {
        return DEFAULT_LOCATION.into();
    };
    debug_assert!(m.is_ascii());
    // a device with its index ("cuda:0", as torch names one) is that device's tier
    let kind = match m.rsplit_once(':') {
        Some((kind, ix)) if !ix.is_empty() && ix.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => m,
    };
    if let Some((_, loc)) = MEDIUM_LOCATIONS[..14]
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(kind))
    {
        return (*loc).into();
    }
    if !m.is_empty()
        && m.len() <= MAX_LOCATION_CHARS
        && m.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return m.into();
    }
    MEDIUM_LOCATIONS[14].1.into()
}

/// Where a block is held, in the order the locations arrived.
#[derive(Clone, Debug)]
#[allow(clippy::box_collection)] // a thin pointer keeps this 16 bytes: one per block of a fleet
enum Locs {
    One(u32),
    Many(Box<Vec<u32>>),
}

impl Locs {
    fn as_slice(&self) -> &[u32] {
        match self {
            Locs::One(l) => std::slice::from_ref(l),
            Locs::Many(v) => v,
        }
    }

    fn contains(&self, loc: u32) -> bool {
        self.as_slice().contains(&loc)
    }

    fn push(&mut self, loc: u32) {
        let mut v = self.as_slice().to_vec();
        v.push(loc);
        *self = Locs::Many(Box::new(v));
    }

    /// Without `loc`; `None` when nothing is left.
    fn without(&self, loc: u32) -> Option<Locs> {
        let v: Vec<u32> = self
            .as_slice()
            .iter()
            .copied()
            .filter(|&l| l != loc)
            .collect();
        match v.len() {
            0 => None,
            1 => Some(Locs::One(v[0])),
            _ => Some(Locs::Many(Box::new(v))),
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    ns: u32,
    key: u64,
    locs: Locs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Admit,
    Evict,
    /// Everything the engine holds in the namespace (location ignored).
    Drop,
}

/// One index operation; `location` indexes `EngineMap::location_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingOp {
    pub kind: OpKind,
    pub location: u32,
    pub keys: Vec<u64>,
}

/// What could not be applied, by reason (the names are the Python side's metric labels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub malformed_events: u64,
    pub multimodal_blocks: u64,
    pub unknown_parent_blocks: u64,
    pub block_size_changes: u64,
    pub unknown_blocks: u64,
    pub unknown_removes: u64,
}

impl Counts {
    pub fn named(&self) -> [(&'static str, u64); 6] {
        [
            ("malformed_events", self.malformed_events),
            ("multimodal_blocks", self.multimodal_blocks),
            ("unknown_parent_blocks", self.unknown_parent_blocks),
            ("block_size_changes", self.block_size_changes),
            ("unknown_blocks", self.unknown_blocks),
            ("unknown_removes", self.unknown_removes),
        ]
    }
}

/// A store as the map takes it: `tokens` are the first `usable` blocks' tokens (`None`: they
/// are not all u32), `root_namespace` names the namespace when there is no parent.
pub struct Store<'a> {
    pub hashes: &'a [EngineHash],
    pub parent: Option<&'a EngineHash>,
    pub tokens: Option<&'a [u32]>,
    pub block_size: usize,
    pub location: u32,
    pub root_namespace: Option<u32>,
    pub usable: usize,
}

#[derive(Default)]
pub struct EngineMap {
    seed: u64,
    blocks: FxMap<EngineHash, Block>,
    /// Block size of each namespace this engine stored into.
    ns_sizes: FxMap<u32, usize>,
    /// Block size -> the namespace of parsed stores without a parent (`set_root_namespace`).
    roots: FxMap<usize, u32>,
    locations: Vec<Arc<str>>,
    location_ix: FxMap<Arc<str>, u32>,
    pending: Vec<(u32, Vec<PendingOp>)>,
    pub counts: Counts,
}

impl EngineMap {
    pub fn new(seed: u64) -> Self {
        EngineMap {
            seed,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn location(&mut self, name: &str) -> u32 {
        if let Some(&ix) = self.location_ix.get(name) {
            return ix;
        }
        let name: Arc<str> = name.into();
        let ix = self.locations.len() as u32;
        self.locations.push(name.clone());
        self.location_ix.insert(name, ix);
        ix
    }

    pub fn location_name(&self, ix: u32) -> &Arc<str> {
        &self.locations[ix as usize]
    }

    /// Every block: (engine hash, namespace number, key, location names).
    pub fn holdings(&self) -> impl Iterator<Item = (&EngineHash, u32, u64, Vec<Arc<str>>)> {
        self.blocks.iter().map(|(h, b)| {
            let locs = b
                .locs
                .as_slice()
                .iter()
                .map(|&l| self.location_name(l).clone());
            (h, b.ns, b.key, locs.collect())
        })
    }

    /// The namespace numbers this engine holds blocks in, ascending.
    pub fn namespaces_held(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.blocks.values().map(|b| b.ns).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The operations since the last call, per namespace in first-touched order.
    pub fn take_pending(&mut self) -> Vec<(u32, Vec<PendingOp>)> {
        std::mem::take(&mut self.pending)
    }

    fn op(&mut self, ns: u32, kind: OpKind, location: u32, keys: &[u64]) {
        let i = match self.pending.iter().position(|(n, _)| *n == ns) {
            Some(i) => i,
            None => {
                self.pending.push((ns, Vec::new()));
                self.pending.len() - 1
            }
        };
        let batch = &mut self.pending[i].1;
        if let Some(last) = batch.last_mut() {
            if last.kind == kind && last.location == location && kind != OpKind::Drop {
                last.keys.extend_from_slice(keys);
                return;
            }
        }
        batch.push(PendingOp {
            kind,
            location,
            keys: keys.to_vec(),
        });
    }

    /// Everything is gone (AllBlocksCleared, a restart, a lost stream): one drop per namespace
    /// held, every tier.
    pub fn clear(&mut self) {
        for ns in self.namespaces_held() {
            self.op(ns, OpKind::Drop, u32::MAX, &[]);
        }
        self.blocks.clear();
    }

    /// Forget every block, and the operations not yet taken, without operations (the engine
    /// left: its holders are removed whole).
    pub fn forget(&mut self) {
        self.blocks.clear();
        self.pending.clear();
    }

    /// A store with tokens; the caller checked `block_size >= 1` and that the tokens make
    /// whole blocks of every hash.
    pub fn store(&mut self, s: &Store<'_>) {
        let n = s.hashes.len();
        let (ns, parent_key) = match s.parent {
            None => match s.root_namespace {
                Some(ns) => (ns, None),
                None => {
                    self.counts.malformed_events += 1;
                    return;
                }
            },
            Some(p) => match self.blocks.get(p) {
                None => {
                    self.counts.unknown_parent_blocks += n as u64;
                    return;
                }
                Some(b) => {
                    if self.ns_sizes.get(&b.ns) != Some(&s.block_size) {
                        self.counts.block_size_changes += n as u64;
                        return;
                    }
                    (b.ns, Some(b.key))
                }
            },
        };
        let usable = s.usable.min(n);
        if usable < n {
            // blocks with multimodal or embedding inputs have placeholder tokens: stop before them
            self.counts.multimodal_blocks += (n - usable) as u64;
            if usable == 0 {
                return;
            }
        }
        let Some(tokens) = s.tokens else {
            self.counts.malformed_events += 1;
            return;
        };
        self.ns_sizes.insert(ns, s.block_size);
        let keys: Vec<u64> =
            ChunkHasher::after(parent_key, tokens, s.block_size, self.seed).collect();
        let loc = s.location;
        for (h, &key) in s.hashes.iter().zip(&keys) {
            let fresh = Block {
                ns,
                key,
                locs: Locs::One(loc),
            };
            match self.blocks.entry(h.clone()) {
                Entry::Vacant(v) => {
                    v.insert(fresh);
                }
                Entry::Occupied(mut o) => {
                    let b = o.get_mut();
                    if b.key != key || b.ns != ns {
                        // the engine reused a hash for other content: its old holding is gone
                        let old = std::mem::replace(b, fresh);
                        for &l in old.locs.as_slice() {
                            self.op(old.ns, OpKind::Evict, l, &[old.key]);
                        }
                    } else if !b.locs.contains(loc) {
                        b.locs.push(loc);
                    }
                }
            }
        }
        self.op(ns, OpKind::Admit, loc, &keys);
    }

    /// A store without tokens (an offload tier announcing blocks by hash): known blocks gain
    /// the location; unknown ones cannot be placed.
    pub fn tier_update(&mut self, hashes: &[EngineHash], location: u32) {
        for h in hashes {
            let Some(b) = self.blocks.get_mut(h) else {
                self.counts.unknown_blocks += 1;
                continue;
            };
            if !b.locs.contains(location) {
                b.locs.push(location);
            }
            let (ns, key) = (b.ns, b.key);
            self.op(ns, OpKind::Admit, location, &[key]);
        }
    }

    pub fn remove(&mut self, hashes: &[EngineHash], location: u32) {
        for h in hashes {
            let Some(b) = self.blocks.get_mut(h).filter(|b| b.locs.contains(location)) else {
                self.counts.unknown_removes += 1;
                continue;
            };
            let (ns, key) = (b.ns, b.key);
            match b.locs.without(location) {
                Some(rest) => b.locs = rest,
                None => {
                    self.blocks.remove(h);
                }
            }
            self.op(ns, OpKind::Evict, location, &[key]);
        }
    }

    /// Where parsed stores without a parent of `block_size` go (the engine's base namespace of
    /// that block size).
    pub fn set_root_namespace(&mut self, block_size: usize, ns: u32) {
        self.roots.insert(block_size, ns);
    }

    /// Apply a parsed batch (kv_payload.rs). When a block size its stores start with has no
    /// namespace yet (`set_root_namespace`), nothing is applied: those sizes are returned.
    pub fn apply_parsed(&mut self, parsed: &crate::kv_payload::Parsed) -> Vec<usize> {
        let missing: Vec<usize> = parsed
            .root_sizes()
            .into_iter()
            .filter(|s| !self.roots.contains_key(s))
            .collect();
        if !missing.is_empty() {
            return missing;
        }
        use crate::kv_payload::Event;
        let locs: Vec<u32> = parsed.locations.iter().map(|l| self.location(l)).collect();
        for ev in &parsed.events {
            match ev {
                Event::Stored {
                    hashes,
                    parent,
                    tokens,
                    block_size,
                    location,
                } => {
                    let hashes = &parsed.hashes[hashes.0..hashes.1];
                    let tokens = &parsed.tokens[tokens.0..tokens.1];
                    let location = locs[*location as usize];
                    if tokens.is_empty() {
                        self.tier_update(hashes, location);
                        continue;
                    }
                    let size = *block_size;
                    if size < 1 || tokens.len() != hashes.len() * size {
                        self.counts.malformed_events += 1;
                        continue;
                    }
                    let root_namespace = self.roots.get(&size).copied();
                    self.store(&Store {
                        hashes,
                        parent: parent.as_ref(),
                        tokens: Some(tokens),
                        block_size: size,
                        location,
                        root_namespace,
                        usable: hashes.len(),
                    });
                }
                Event::Removed { hashes, location } => {
                    self.remove(&parsed.hashes[hashes.0..hashes.1], locs[*location as usize]);
                }
                Event::Cleared => self.clear(),
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::chunk_hashes_after;

    fn h(v: u64) -> EngineHash {
        EngineHash::Int(v)
    }

    fn store(
        m: &mut EngineMap,
        hashes: &[EngineHash],
        parent: Option<&EngineHash>,
        tokens: &[u32],
        loc: u32,
    ) {
        m.store(&Store {
            hashes,
            parent,
            tokens: Some(tokens),
            block_size: 2,
            location: loc,
            root_namespace: Some(0),
            usable: hashes.len(),
        });
    }

    #[test]
    fn stores_chain_after_the_parent_and_removes_per_location() {
        let mut m = EngineMap::new(5);
        let (gpu, cpu) = (m.location("GPU"), m.location("CPU"));
        store(&mut m, &[h(1), h(2)], None, &[1, 2, 3, 4], gpu);
        store(&mut m, &[h(3)], Some(&h(2)), &[5, 6], gpu);
        let keys = chunk_hashes_after(None, &[1, 2, 3, 4, 5, 6], 2, 5);
        m.tier_update(&[h(1), h(9)], cpu);
        m.remove(&[h(1), h(1)], gpu);
        let ops = m.take_pending();
        assert_eq!(ops.len(), 1);
        let kinds: Vec<_> = ops[0]
            .1
            .iter()
            .map(|o| (o.kind, o.location, o.keys.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (OpKind::Admit, gpu, keys.clone()),
                (OpKind::Admit, cpu, vec![keys[0]]),
                (OpKind::Evict, gpu, vec![keys[0]]),
            ]
        );
        assert_eq!((m.counts.unknown_blocks, m.counts.unknown_removes), (1, 1));
        store(&mut m, &[h(4)], Some(&h(77)), &[1, 2], gpu);
        assert_eq!(m.counts.unknown_parent_blocks, 1);
        m.clear();
        assert!(m.is_empty());
        assert_eq!(m.take_pending()[0].1[0].kind, OpKind::Drop);
    }

    #[test]
    fn a_reused_hash_evicts_the_old_holding_everywhere() {
        let mut m = EngineMap::new(0);
        let (gpu, cpu) = (m.location("GPU"), m.location("CPU"));
        store(&mut m, &[h(1)], None, &[1, 2], gpu);
        m.tier_update(&[h(1)], cpu);
        m.take_pending();
        store(&mut m, &[h(1)], None, &[3, 4], gpu);
        let old = chunk_hashes_after(None, &[1, 2], 2, 0)[0];
        let ops = &m.take_pending()[0].1;
        assert_eq!(
            ops[0],
            PendingOp {
                kind: OpKind::Evict,
                location: gpu,
                keys: vec![old]
            }
        );
        assert_eq!(
            ops[1],
            PendingOp {
                kind: OpKind::Evict,
                location: cpu,
                keys: vec![old]
            }
        );
        assert_eq!(ops[2].kind, OpKind::Admit);
    }

    #[test]
    fn media_map_to_locations() {
        assert_eq!(&*location_of(None), "GPU");
        assert_eq!(&*location_of(Some("cpu_pinned")), "LocalCPUBackend");
        assert_eq!(&*location_of(Some("XPU_HBM")), "XPU_HBM");
        assert_eq!(&*location_of(Some("")), "unknown-medium");
        assert_eq!(&*location_of(Some("a\tb")), "unknown-medium");
        assert_eq!(&*location_of(Some(&"x".repeat(65))), "unknown-medium");
    }
}
