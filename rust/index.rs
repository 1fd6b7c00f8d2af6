//! The index state (one left-right copy) and every operation on it.
//!
//! `Core` = the chunk table (chained prefix hash -> holder set) + the holder registry. All
//! mutation goes through `Op`s, absorbed deterministically into both left-right copies (see
//! `shared.rs`); reads are plain `&self` methods.

use std::sync::Arc;

use left_right::Absorb;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{Error, Result};
use crate::hash::{ChunkHasher, PrefixHash, TokenCursor};
use crate::holders::{
    pair, unpair, FxMap, HolderIx, InstanceIx, LocationIx, Registry, SetIx, WorkerId,
    RESERVED_INSTANCE_IDS,
};
use crate::keyspace::{ChunkKeys, KeySpace};
use crate::pyhash::LmcacheHasher;
use crate::table::Table;

/// How many keys ahead a batch write prefetches table slots: enough to keep several misses in
/// flight, few enough that the lines are still cached when their turn comes.
const PREFETCH_AHEAD: usize = 8;

/// What to do with a holder's chunks in a batch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Admit,
    Evict,
    /// Drop everything the worker holds at the event's location (keys ignored).
    Drop,
    /// Drop everything the worker holds anywhere (location and keys ignored).
    DropAll,
}

/// One event of a batch; its keys are `Batch::keys[start..end]`.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub instance: Arc<str>,
    pub worker: WorkerId,
    pub location: Arc<str>,
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub keys: Vec<PrefixHash>,
}

impl Batch {
    /// One batch doing what `batches` do applied one after another.
    pub fn join(batches: &[Arc<Batch>]) -> Batch {
        let mut out = Batch {
            events: Vec::with_capacity(batches.iter().map(|b| b.events.len()).sum()),
            keys: Vec::with_capacity(batches.iter().map(|b| b.keys.len()).sum()),
        };
        for b in batches {
            let shift = out.keys.len();
            out.keys.extend_from_slice(&b.keys);
            out.events.extend(b.events.iter().map(|e| Event {
                start: e.start + shift,
                end: e.end + shift,
                ..e.clone()
            }));
        }
        out
    }
}

/// A write, logged once and absorbed into both copies.
#[derive(Debug)]
pub enum Op {
    RegisterWorker(Arc<str>, WorkerId),
    RemoveWorker(Arc<str>, WorkerId),
    Admit(Arc<Event>, Arc<[PrefixHash]>),
    Evict(Arc<Event>, Arc<[PrefixHash]>),
    Batch(Arc<Batch>),
    Clear(Arc<str>, Option<Arc<str>>),
    /// Replace the whole state (snapshot load).
    Replace(Arc<Core>),
}

/// Counts returned by the last absorbed op: (added, removed).
pub type OpResult = (u64, u64);

#[derive(Clone, Debug)]
pub struct Core {
    pub chunk_size: usize,
    pub key_space: KeySpace,
    pub table: Table,
    pub reg: Registry,
    /// Result of the last absorbed op (read back by the writer after publishing).
    pub last: OpResult,
}

/// One instance's answer: best location and matched tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub instance: Arc<str>,
    pub location: Arc<str>,
    pub length: u64,
}

/// (location, matched tokens).
pub type LocationMatch = (Arc<str>, u64);

/// One instance's detailed answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetailedMatch {
    pub instance: Arc<str>,
    /// Best location instance-wide, if any location matches > 0.
    pub best: Option<(Arc<str>, u64)>,
    /// Instance-wide match per location (all live workers), sorted by location name.
    pub locations: Vec<LocationMatch>,
    /// Each worker's own prefix per location (> 0 only), sorted.
    pub workers: Vec<(WorkerId, Vec<LocationMatch>)>,
}

/// Check an instance id that is about to be registered.
pub fn validate_instance_id(name: &str) -> Result<()> {
    if RESERVED_INSTANCE_IDS.contains(&name) {
        return Err(Error::arg(format!(
            "instance_id {name:?} is reserved (it is a key of the /lookup response)"
        )));
    }
    Ok(())
}

/// Sorted intersection in place: keep items of `cand` present in `other`; dropped items are
/// passed to `dropped`.
#[inline]
fn intersect<T: Ord + Copy>(cand: &mut Vec<T>, other: &[T], mut dropped: impl FnMut(T)) {
    let mut j = 0;
    cand.retain(|x| {
        while j < other.len() && other[j] < *x {
            j += 1;
        }
        let keep = j < other.len() && other[j] == *x;
        if !keep {
            dropped(*x);
        }
        keep
    });
}

impl Core {
    pub fn new(chunk_size: usize, key_space: KeySpace) -> Self {
        Core {
            chunk_size,
            key_space,
            table: Table::new(),
            reg: Registry::default(),
            last: (0, 0),
        }
    }

    // ---- writes ------------------------------------------------------------------------

    pub fn apply(&mut self, op: &Op) -> OpResult {
        // a resize under way moves its share for the op's keys in one pass, before them
        match op {
            Op::Admit(_, keys) | Op::Evict(_, keys) => self.table.prepay(keys.len()),
            Op::Batch(b) => self.table.prepay(b.keys.len()),
            _ => {}
        }
        let r = match op {
            Op::RegisterWorker(inst, w) => {
                self.reg.register_worker(inst, *w);
                (0, 0)
            }
            Op::RemoveWorker(inst, w) => (0, self.remove_worker(inst, *w)),
            Op::Admit(ev, keys) => (self.admit(&ev.instance, ev.worker, &ev.location, keys), 0),
            Op::Evict(ev, keys) => (0, self.evict(&ev.instance, ev.worker, &ev.location, keys)),
            Op::Batch(b) => {
                let (mut a, mut e) = (0, 0);
                for ev in &b.events {
                    let keys = &b.keys[ev.start..ev.end];
                    match ev.kind {
                        EventKind::Admit => {
                            a += self.admit(&ev.instance, ev.worker, &ev.location, keys)
                        }
                        EventKind::Evict => {
                            e += self.evict(&ev.instance, ev.worker, &ev.location, keys)
                        }
                        EventKind::Drop => {
                            e += self.drop_worker(&ev.instance, ev.worker, Some(&ev.location))
                        }
                        EventKind::DropAll => e += self.drop_worker(&ev.instance, ev.worker, None),
                    }
                }
                (a, e)
            }
            Op::Clear(inst, loc) => (0, self.clear(inst, loc.as_deref())),
            Op::Replace(core) => {
                *self = (**core).clone();
                (0, 0)
            }
        };
        self.reg.maybe_gc();
        self.last = r;
        r
    }

    /// Record that (inst, worker, loc) holds `keys`; registers the worker. Returns new holdings.
    pub fn admit(&mut self, inst: &str, worker: WorkerId, loc: &str, keys: &[PrefixHash]) -> u64 {
        let h = self.reg.intern_holder(inst, worker, loc);
        let added = self.move_keys(keys, true, |reg, s| reg.with_holder(s, h));
        self.reg.add_count(h, added);
        added
    }

    /// Forget that (inst, worker, loc) holds `keys`. Returns holdings removed.
    pub fn evict(&mut self, inst: &str, worker: WorkerId, loc: &str, keys: &[PrefixHash]) -> u64 {
        let Some(h) = self.reg.find_holder(inst, worker, loc) else {
            return 0;
        };
        let removed = self.move_keys(keys, false, |reg, s| reg.without_holder(s, h));
        self.reg.sub_count(h, removed);
        removed
    }

    /// Move each key from its holder set `s` to `step(s)`, dropping keys left with the empty
    /// set. A key not in the table starts from the empty set when `insert_absent`, else it is
    /// skipped. Returns how many keys changed set.
    fn move_keys(
        &mut self,
        keys: &[PrefixHash],
        insert_absent: bool,
        mut step: impl FnMut(&mut Registry, SetIx) -> SetIx,
    ) -> u64 {
        let reg = &mut self.reg;
        let mut changed = 0u64;
        // consecutive chunks usually share a set: remember the last transition
        let mut memo = (SetIx(u32::MAX), SetIx(u32::MAX));
        for (i, &k) in keys.iter().enumerate() {
            // the slots of keys a few places ahead load while this one is updated
            if let Some(&ahead) = keys.get(i + PREFETCH_AHEAD) {
                if insert_absent {
                    self.table.prefetch_insert(ahead);
                } else {
                    self.table.prefetch(ahead);
                }
            }
            self.table.update(k, |cur| {
                let s = match cur {
                    Some(s) => SetIx(s),
                    None if insert_absent => SetIx::EMPTY,
                    None => return None,
                };
                let t = if s == memo.0 {
                    memo.1
                } else {
                    let t = step(reg, s);
                    memo = (s, t);
                    t
                };
                if t != s {
                    reg.decref(s);
                    reg.incref(t);
                    changed += 1;
                }
                (t != SetIx::EMPTY).then_some(t.0)
            });
        }
        changed
    }

    /// Drop every holding of the given holders (sorted). Returns holdings removed.
    fn drop_holders(&mut self, drop: &[HolderIx]) -> u64 {
        if drop.iter().all(|h| self.reg.holder(*h).count == 0) {
            return 0;
        }
        let reg = &mut self.reg;
        let mut remap: FxMap<u32, SetIx> = FxMap::default();
        let mut removed = 0u64;
        self.table.retain_map(|_, s| {
            let s = SetIx(s);
            let t = *remap
                .entry(s.0)
                .or_insert_with(|| reg.without_holders(s, drop));
            if t != s {
                removed += (reg.set(s).holders.len() - reg.set(t).holders.len()) as u64;
                reg.decref(s);
                reg.incref(t);
            }
            (t != SetIx::EMPTY).then_some(t.0)
        });
        for h in drop {
            let c = reg.holder(*h).count;
            reg.sub_count(*h, c);
        }
        removed
    }

    /// Unregister the worker and drop its holdings. Returns holdings dropped.
    pub fn remove_worker(&mut self, inst: &str, worker: WorkerId) -> u64 {
        let Some(i) = self.reg.find_instance(inst) else {
            return 0;
        };
        let drop = self
            .reg
            .holders_where(|h| h.inst == i && h.worker == worker);
        let removed = self.drop_holders(&drop);
        self.reg.unregister_worker(i, worker);
        self.reg.gc();
        removed
    }

    /// Drop the worker's holdings (at one location, or all) but keep it registered.
    pub fn drop_worker(&mut self, inst: &str, worker: WorkerId, loc: Option<&str>) -> u64 {
        self.drop_matching(inst, Some(worker), loc)
    }

    /// Drop the instance's holdings (at one location, or all). Returns holdings dropped.
    pub fn clear(&mut self, inst: &str, loc: Option<&str>) -> u64 {
        self.drop_matching(inst, None, loc)
    }

    /// Drop the holdings of `inst` by one worker (or all) at one location (or all); workers
    /// stay registered. Returns holdings dropped.
    fn drop_matching(&mut self, inst: &str, worker: Option<WorkerId>, loc: Option<&str>) -> u64 {
        let Some(i) = self.reg.find_instance(inst) else {
            return 0;
        };
        let l = match loc.map(|name| self.reg.find_location(name)) {
            // a location never interned holds nothing
            Some(None) => return 0,
            l => l.flatten(),
        };
        let drop = self.reg.holders_where(|h| {
            h.inst == i && worker.is_none_or(|w| h.worker == w) && l.is_none_or(|l| h.loc == l)
        });
        let removed = self.drop_holders(&drop);
        self.reg.gc();
        removed
    }

    // ---- reads -------------------------------------------------------------------------

    /// Walk the chunks of `tokens` from the root while some (instance, location) pair still
    /// matches; hashes lazily. Calls `on_set(set, matched_before)` for each new set met and
    /// returns the total matched tokens of the walk (the last chunk where `keep_going` held).
    fn walk(&self, tokens: &[u32], on_set: impl FnMut(SetIx, u64) -> bool) -> u64 {
        // one match per walk; each arm runs a loop compiled for its own hasher
        match self.key_space {
            KeySpace::Xxh3 { seed } => {
                self.walk_keys(ChunkHasher::new(tokens, self.chunk_size, seed), on_set)
            }
            KeySpace::LmcacheBuiltin { none_hash } => self.walk_keys(
                LmcacheHasher::new(tokens, self.chunk_size, none_hash),
                on_set,
            ),
        }
    }

    #[inline(always)]
    fn walk_keys(
        &self,
        mut hasher: impl ChunkKeys,
        mut on_set: impl FnMut(SetIx, u64) -> bool,
    ) -> u64 {
        let mut matched = 0u64;
        let mut prev = SetIx(u32::MAX);
        // One chunk ahead: the next key is hashed, and its slot prefetched, while this key's
        // slot is still on its way from memory.
        let mut n = hasher.next_len() as u64;
        let mut key = hasher.next();
        if let Some(k) = key {
            self.table.prefetch(k);
        }
        while let Some(k) = key {
            let next_n = hasher.next_len() as u64;
            let next_key = hasher.next();
            if let Some(k) = next_key {
                self.table.prefetch(k);
            }
            let Some(s) = self.table.get(k) else { break };
            let s = SetIx(s);
            if s != prev {
                if !on_set(s, matched) {
                    break;
                }
                prev = s;
            }
            matched += n;
            (n, key) = (next_n, next_key);
        }
        matched
    }

    /// Every instance with a match > 0: its best location and matched tokens, sorted by
    /// instance id.
    pub fn lookup(&self, tokens: &[u32]) -> Vec<Match> {
        self.lookup_from(tokens)
    }

    /// `lookup` for tokens read from a cursor, which is asked for no more chunks than the walk
    /// hashes.
    pub fn lookup_from(&self, tokens: impl TokenCursor) -> Vec<Match> {
        match self.key_space {
            KeySpace::Xxh3 { seed } => {
                self.lookup_by(ChunkHasher::over(None, tokens, self.chunk_size, seed))
            }
            KeySpace::LmcacheBuiltin { none_hash } => {
                self.lookup_by(LmcacheHasher::new(tokens, self.chunk_size, none_hash))
            }
        }
    }

    /// Like `lookup`, for chunk keys already computed (a peer asking by its keys): lengths
    /// are counted in chunks.
    pub fn lookup_keys(&self, keys: &[PrefixHash]) -> Vec<Match> {
        self.lookup_by(KeyList(keys.iter()))
    }

    #[inline(always)]
    fn lookup_by(&self, keys: impl ChunkKeys) -> Vec<Match> {
        let mut cand: Vec<u64> = Vec::new();
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut first = true;
        let total = self.walk_keys(keys, |s, matched| {
            let cov = &self.reg.set(s).covered;
            if first {
                cand.extend_from_slice(cov);
                first = false;
            } else {
                intersect(&mut cand, cov, |p| done.push((p, matched)));
            }
            !cand.is_empty()
        });
        done.extend(cand.iter().map(|p| (*p, total)));
        let mut out: Vec<Match> = self
            .best_per_instance(&done)
            .into_iter()
            .map(|(i, l, n)| Match {
                instance: self.reg.instance(i).name.clone(),
                location: self.reg.location(l).name.clone(),
                length: n,
            })
            .collect();
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }

    /// Per instance, the longest match; ties to the faster tier, then by location name.
    fn best_per_instance(&self, pairs: &[(u64, u64)]) -> Vec<(InstanceIx, LocationIx, u64)> {
        let mut best: Vec<(InstanceIx, LocationIx, u64)> = Vec::new();
        for &(p, n) in pairs {
            if n == 0 {
                continue;
            }
            let (i, l) = unpair(p);
            match best.iter_mut().find(|b| b.0 == i) {
                None => best.push((i, l, n)),
                Some(b) => {
                    if self.better(l, n, b.1, b.2) {
                        *b = (i, l, n);
                    }
                }
            }
        }
        best
    }

    fn better(&self, l: LocationIx, n: u64, bl: LocationIx, bn: u64) -> bool {
        if n != bn {
            return n > bn;
        }
        let (a, b) = (self.reg.location(l), self.reg.location(bl));
        (a.rank, &a.name) < (b.rank, &b.name)
    }

    /// Every instance where some worker holds a prefix, with per-location and per-worker
    /// detail, sorted by instance id.
    pub fn lookup_detailed(&self, tokens: &[u32]) -> Vec<DetailedMatch> {
        let mut cand: Vec<u64> = Vec::new();
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut hcand: Vec<HolderIx> = Vec::new();
        let mut hdone: Vec<(HolderIx, u64)> = Vec::new();
        let mut first = true;
        let total = self.walk(tokens, |s, matched| {
            let set = self.reg.set(s);
            if first {
                cand.extend_from_slice(&set.covered);
                hcand.extend_from_slice(&set.holders);
                first = false;
            } else {
                intersect(&mut cand, &set.covered, |p| done.push((p, matched)));
                intersect(&mut hcand, &set.holders, |h| hdone.push((h, matched)));
            }
            !hcand.is_empty()
        });
        done.extend(cand.iter().map(|p| (*p, total)));
        hdone.extend(hcand.iter().map(|h| (*h, total)));
        let best = self.best_per_instance(&done);
        let mut out: Vec<DetailedMatch> = Vec::new();
        let mut by_inst: FxMap<u32, usize> = FxMap::default();
        for &(h, n) in &hdone {
            if n == 0 {
                continue;
            }
            let holder = self.reg.holder(h);
            let idx = *by_inst.entry(holder.inst.0).or_insert_with(|| {
                out.push(DetailedMatch {
                    instance: self.reg.instance(holder.inst).name.clone(),
                    best: best
                        .iter()
                        .find(|b| b.0 == holder.inst)
                        .map(|b| (self.reg.location(b.1).name.clone(), b.2)),
                    locations: Vec::new(),
                    workers: Vec::new(),
                });
                out.len() - 1
            });
            let d = &mut out[idx];
            let loc = self.reg.location(holder.loc).name.clone();
            if !d.locations.iter().any(|(l, _)| *l == loc) {
                let p = pair(holder.inst, holder.loc);
                let inst_n = done.iter().find(|x| x.0 == p).map_or(0, |x| x.1);
                d.locations.push((loc.clone(), inst_n));
            }
            match d.workers.iter_mut().find(|w| w.0 == holder.worker) {
                Some(w) => w.1.push((loc, n)),
                None => d.workers.push((holder.worker, vec![(loc, n)])),
            }
        }
        for d in &mut out {
            d.locations.sort();
            d.workers.sort();
            for w in &mut d.workers {
                w.1.sort();
            }
        }
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }

    /// Live workers per instance, sorted.
    pub fn workers(&self) -> Vec<(Arc<str>, Vec<WorkerId>)> {
        let mut v: Vec<_> = self
            .reg
            .instances
            .iter()
            .flatten()
            .filter(|i| !i.workers.is_empty())
            .map(|i| (i.name.clone(), i.workers.clone()))
            .collect();
        v.sort();
        v
    }

    /// (instance, worker, location, chunks) for every holder holding something, sorted.
    pub fn holder_counts(&self) -> Vec<(Arc<str>, WorkerId, Arc<str>, u64)> {
        let mut v: Vec<_> = self
            .reg
            .holders
            .iter()
            .flatten()
            .filter(|h| h.count > 0)
            .map(|h| {
                (
                    self.reg.instance(h.inst).name.clone(),
                    h.worker,
                    self.reg.location(h.loc).name.clone(),
                    h.count,
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn heap_bytes(&self) -> usize {
        self.table.heap_bytes() + self.reg.heap_bytes()
    }

    /// (name, value) statistics; `bytes` counts both left-right copies.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let chunks = self.table.len() as u64;
        let live_inst = self
            .reg
            .instances
            .iter()
            .flatten()
            .filter(|i| !i.workers.is_empty());
        vec![
            ("chunks", chunks),
            ("nodes", chunks),
            (
                "holders",
                self.reg
                    .holders
                    .iter()
                    .flatten()
                    .filter(|h| h.count > 0)
                    .count() as u64,
            ),
            ("holdings", self.reg.holdings),
            ("instances", live_inst.clone().count() as u64),
            ("workers", live_inst.map(|i| i.workers.len() as u64).sum()),
            ("holder_sets", self.reg.live_sets() as u64),
            ("bytes", 2 * self.heap_bytes() as u64),
        ]
    }

    /// Check every invariant of this copy.
    pub fn check(&self) -> Result<()> {
        self.table.check().map_err(Error::invariant)?;
        let mut refs = vec![0u64; self.reg.sets.len()];
        let mut counts = vec![0u64; self.reg.holders.len()];
        for (k, s) in self.table.iter() {
            let set =
                self.reg.sets.get(s as usize).ok_or_else(|| {
                    Error::invariant(format!("key {k:#x} maps to unknown set {s}"))
                })?;
            if s == 0 || set.holders.is_empty() {
                return Err(Error::invariant(format!("key {k:#x} maps to an empty set")));
            }
            refs[s as usize] += 1;
        }
        for (s, set) in self.reg.sets.iter().enumerate() {
            for h in set.holders.iter() {
                if let Some(c) = counts.get_mut(h.ix()) {
                    *c += refs[s];
                }
            }
        }
        self.reg.check(&refs, &counts).map_err(Error::invariant)
    }

    /// An order-independent digest of what the index says: the wrapping sum of one xxh3
    /// per (chunk key, holder) pair and one per registered worker. Two indexes built by any
    /// order of operations that leaves the same holdings and workers agree.
    pub fn content_digest(&self) -> u64 {
        let mut sum = 0u64;
        let mut buf = Vec::with_capacity(64);
        for (key, set) in self.table.iter() {
            for &h in self.reg.set(SetIx(set)).holders.iter() {
                let holder = self.reg.holder(h);
                buf.clear();
                buf.push(b'h');
                buf.extend_from_slice(&key.to_le_bytes());
                buf.extend_from_slice(&holder.worker.to_le_bytes());
                buf.extend_from_slice(self.reg.instance(holder.inst).name.as_bytes());
                buf.push(0);
                buf.extend_from_slice(self.reg.location(holder.loc).name.as_bytes());
                sum = sum.wrapping_add(xxh3_64(&buf));
            }
        }
        for (inst, workers) in self.workers() {
            for w in workers {
                buf.clear();
                buf.push(b'w');
                buf.extend_from_slice(&w.to_le_bytes());
                buf.extend_from_slice(inst.as_bytes());
                sum = sum.wrapping_add(xxh3_64(&buf));
            }
        }
        sum
    }

    /// A digest of the whole structure; both left-right copies must agree.
    pub fn digest(&self) -> u64 {
        let mut h = Xxh3::new();
        h.update(&(self.chunk_size as u64).to_le_bytes());
        h.update(self.key_space.name().as_bytes());
        h.update(&self.key_space.seed().to_le_bytes());
        h.update(&self.key_space.none_hash().to_le_bytes());
        h.update(&(self.table.capacity() as u64).to_le_bytes());
        for (k, v) in self.table.iter() {
            h.update(&k.to_le_bytes());
            h.update(&v.to_le_bytes());
        }
        self.reg.digest_into(&mut |b| h.update(b));
        h.digest()
    }
}

impl Absorb<Op> for Core {
    fn absorb_first(&mut self, op: &mut Op, _other: &Self) {
        self.apply(op);
    }

    fn absorb_second(&mut self, op: Op, _other: &Self) {
        match op {
            // the last copy to see a snapshot takes it without cloning
            Op::Replace(core) => {
                *self = Arc::try_unwrap(core).unwrap_or_else(|c| (*c).clone());
                self.reg.maybe_gc();
                self.last = (0, 0);
            }
            op => {
                self.apply(&op);
            }
        }
    }

    fn sync_with(&mut self, first: &Self) {
        *self = first.clone();
    }
}

/// Given keys, one chunk each.
struct KeyList<'a>(std::slice::Iter<'a, PrefixHash>);

impl Iterator for KeyList<'_> {
    type Item = PrefixHash;

    #[inline]
    fn next(&mut self) -> Option<PrefixHash> {
        self.0.next().copied()
    }
}

impl ChunkKeys for KeyList<'_> {
    #[inline]
    fn next_len(&self) -> usize {
        usize::from(self.0.len() > 0)
    }
}

#[cfg(test)]
mod join_tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(events: &[(u8, u8, u8, Vec<u64>)]) -> Arc<Batch> {
        let mut b = Batch::default();
        for (kind, inst, loc, keys) in events {
            let start = b.keys.len();
            b.keys.extend_from_slice(keys);
            b.events.push(Event {
                kind: [EventKind::Admit, EventKind::Evict, EventKind::Drop][*kind as usize % 3],
                instance: format!("i{}", inst % 2).into(),
                worker: 0,
                location: ["GPU", "LocalCPUBackend"][*loc as usize % 2].into(),
                start,
                end: b.keys.len(),
            });
        }
        Arc::new(b)
    }

    proptest! {
        /// Batches joined into one do what they do applied one after another.
        #[test]
        fn a_joined_batch_is_the_batches_in_order(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (0u8..3, 0u8..2, 0u8..2, proptest::collection::vec(1u64..40, 0..8)), 1..4),
                1..6),
        ) {
            let batches: Vec<Arc<Batch>> = batches.iter().map(|b| batch(b)).collect();
            let mut one_by_one = Core::new(4, KeySpace::Xxh3 { seed: 0 });
            let mut total = (0, 0);
            for b in &batches {
                let (a, e) = one_by_one.apply(&Op::Batch(b.clone()));
                total.0 += a;
                total.1 += e;
            }
            let mut joined = Core::new(4, KeySpace::Xxh3 { seed: 0 });
            let got = joined.apply(&Op::Batch(Arc::new(Batch::join(&batches))));
            prop_assert_eq!(got, total);
            prop_assert_eq!(joined.content_digest(), one_by_one.content_digest());
            joined.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}
