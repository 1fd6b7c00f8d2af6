//! The holder registry: interned instances, locations, holders and holder sets.
//!
//! A *holder* is (instance, worker, location). A chunk's value in the table is the id of an
//! interned, reference-counted *holder set*; most chunks share a few sets, so a chunk costs one
//! u32 however many holders it has. Each set precomputes the (instance, location) pairs it fully
//! covers (every live worker of the instance holds it there), which is all a lookup needs.
//! Admit/evict move a chunk from one set to another through cached transitions.
//!
//! Sets whose count drops to zero stay interned (a transition may revive them) until a
//! deterministic collection frees them together with unused holders, locations and instances.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// A small, fast, deterministic hasher (the FxHash mix). Both left-right copies must make the
/// same choices, and no map here is ever iterated in an order that matters.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl FxHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.hash = (self.hash.rotate_left(5) ^ x).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // fold the high bits down: hashbrown uses the top 7 bits and the low bits
        self.hash.rotate_left(26)
    }
}

pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u32);
        impl $name {
            #[inline]
            pub fn ix(self) -> usize {
                self.0 as usize
            }
        }
    };
}

newtype!(
    /// Interned instance id (an `instance_id` string).
    InstanceIx
);
newtype!(
    /// Interned location name ("LocalCPUBackend", ...).
    LocationIx
);
newtype!(
    /// Interned holder: (instance, worker, location).
    HolderIx
);
newtype!(
    /// Interned holder set; the value stored per chunk. `SetIx::EMPTY` is never stored.
    SetIx
);

impl SetIx {
    pub const EMPTY: SetIx = SetIx(0);
}

/// A worker id (tensor-parallel rank) as given by the user.
pub type WorkerId = u32;

/// An (instance, location) pair packed for fast sorted intersection.
#[inline]
pub fn pair(inst: InstanceIx, loc: LocationIx) -> u64 {
    ((inst.0 as u64) << 32) | loc.0 as u64
}

#[inline]
pub fn unpair(p: u64) -> (InstanceIx, LocationIx) {
    (InstanceIx((p >> 32) as u32), LocationIx(p as u32))
}

/// Instance ids that would collide with keys of the /lookup response.
pub const RESERVED_INSTANCE_IDS: [&str; 3] = ["event_id", "layout_info", "detail"];

/// Tier rank of a location: faster tiers win ties (GPU < LocalCPUBackend < LocalDiskBackend <
/// anything else, then by name), as `reference_model.tier_key`.
pub fn tier_rank(name: &str) -> u8 {
    match name {
        "GPU" => 0,
        "LocalCPUBackend" => 1,
        "LocalDiskBackend" => 2,
        _ => 3,
    }
}

#[derive(Clone, Debug)]
pub struct Instance {
    pub name: Arc<str>,
    /// Live workers, sorted.
    pub workers: Vec<WorkerId>,
}

#[derive(Clone, Debug)]
pub struct Location {
    pub name: Arc<str>,
    pub rank: u8,
}

#[derive(Clone, Debug)]
pub struct Holder {
    pub inst: InstanceIx,
    pub worker: WorkerId,
    pub loc: LocationIx,
    /// Chunks this holder holds.
    pub count: u64,
}

#[derive(Clone, Debug, Default)]
pub struct HolderSet {
    /// Sorted, distinct. Empty for the empty set and for freed slots.
    pub holders: Box<[HolderIx]>,
    /// Sorted (instance, location) pairs this set fully covers.
    pub covered: Box<[u64]>,
    /// Chunks whose value is this set.
    pub refs: u64,
}

#[derive(Clone, Debug)]
pub struct Registry {
    pub instances: Vec<Option<Instance>>,
    instance_ix: FxMap<Arc<str>, InstanceIx>,
    free_instances: Vec<u32>,
    pub locations: Vec<Option<Location>>,
    location_ix: FxMap<Arc<str>, LocationIx>,
    free_locations: Vec<u32>,
    pub holders: Vec<Option<Holder>>,
    holder_ix: FxMap<(u32, u32, u32), HolderIx>,
    free_holders: Vec<u32>,
    pub sets: Vec<HolderSet>,
    set_ix: FxMap<Box<[HolderIx]>, SetIx>,
    free_sets: Vec<u32>,
    add_cache: FxMap<(u32, u32), SetIx>,
    del_cache: FxMap<(u32, u32), SetIx>,
    /// Interned sets (other than the empty set) with no chunk.
    dead_sets: usize,
    /// Total (holder, chunk) pairs.
    pub holdings: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            instances: Vec::new(),
            instance_ix: FxMap::default(),
            free_instances: Vec::new(),
            locations: Vec::new(),
            location_ix: FxMap::default(),
            free_locations: Vec::new(),
            holders: Vec::new(),
            holder_ix: FxMap::default(),
            free_holders: Vec::new(),
            sets: vec![HolderSet::default()],
            set_ix: FxMap::default(),
            free_sets: Vec::new(),
            add_cache: FxMap::default(),
            del_cache: FxMap::default(),
            dead_sets: 0,
            holdings: 0,
        }
    }
}

fn alloc<T>(vec: &mut Vec<Option<T>>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(i) => {
            vec[i as usize] = Some(item);
            i
        }
        None => {
            vec.push(Some(item));
            (vec.len() - 1) as u32
        }
    }
}

impl Registry {
    // ---- names -------------------------------------------------------------------------

    pub fn find_instance(&self, name: &str) -> Option<InstanceIx> {
        self.instance_ix.get(name).copied()
    }

    pub fn instance(&self, i: InstanceIx) -> &Instance {
        self.instances[i.ix()].as_ref().expect("live instance")
    }

    pub fn location(&self, l: LocationIx) -> &Location {
        self.locations[l.ix()].as_ref().expect("live location")
    }

    pub fn holder(&self, h: HolderIx) -> &Holder {
        self.holders[h.ix()].as_ref().expect("live holder")
    }

    pub fn find_location(&self, name: &str) -> Option<LocationIx> {
        self.location_ix.get(name).copied()
    }

    fn intern_instance(&mut self, name: &str) -> InstanceIx {
        if let Some(i) = self.instance_ix.get(name) {
            return *i;
        }
        let name: Arc<str> = Arc::from(name);
        let inst = Instance {
            name: name.clone(),
            workers: Vec::new(),
        };
        let i = InstanceIx(alloc(&mut self.instances, &mut self.free_instances, inst));
        self.instance_ix.insert(name, i);
        i
    }

    fn intern_location(&mut self, name: &str) -> LocationIx {
        if let Some(l) = self.location_ix.get(name) {
            return *l;
        }
        let name: Arc<str> = Arc::from(name);
        let loc = Location {
            rank: tier_rank(&name),
            name: name.clone(),
        };
        let l = LocationIx(alloc(&mut self.locations, &mut self.free_locations, loc));
        self.location_ix.insert(name, l);
        l
    }

    pub fn find_holder(&self, inst: &str, worker: WorkerId, loc: &str) -> Option<HolderIx> {
        let i = self.find_instance(inst)?;
        let l = self.find_location(loc)?;
        self.holder_ix.get(&(i.0, worker, l.0)).copied()
    }

    /// The holder for (inst, worker, loc), registering the worker and interning as needed.
    pub fn intern_holder(&mut self, inst: &str, worker: WorkerId, loc: &str) -> HolderIx {
        let i = self.register_worker(inst, worker);
        let l = self.intern_location(loc);
        if let Some(h) = self.holder_ix.get(&(i.0, worker, l.0)) {
            return *h;
        }
        let holder = Holder {
            inst: i,
            worker,
            loc: l,
            count: 0,
        };
        let h = HolderIx(alloc(&mut self.holders, &mut self.free_holders, holder));
        self.holder_ix.insert((i.0, worker, l.0), h);
        h
    }

    // ---- membership --------------------------------------------------------------------

    /// Register a live worker; recomputes the sets' covered pairs when membership changes.
    pub fn register_worker(&mut self, inst: &str, worker: WorkerId) -> InstanceIx {
        let i = self.intern_instance(inst);
        let workers = &mut self.instances[i.ix()].as_mut().expect("live").workers;
        if let Err(pos) = workers.binary_search(&worker) {
            workers.insert(pos, worker);
            self.recompute_covered();
        }
        i
    }

    /// Remove a worker from its instance's live set (its holdings must be dropped first).
    pub fn unregister_worker(&mut self, i: InstanceIx, worker: WorkerId) -> bool {
        let workers = &mut self.instances[i.ix()].as_mut().expect("live").workers;
        match workers.binary_search(&worker) {
            Ok(pos) => {
                workers.remove(pos);
                self.recompute_covered();
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_live_worker(&self, i: InstanceIx, worker: WorkerId) -> bool {
        self.instance(i).workers.binary_search(&worker).is_ok()
    }

    /// The (instance, location) pairs fully covered by `holders`, sorted.
    pub fn covered_of(&self, holders: &[HolderIx]) -> Box<[u64]> {
        let mut pairs: Vec<u64> = holders
            .iter()
            .filter_map(|h| {
                let h = self.holder(*h);
                self.is_live_worker(h.inst, h.worker)
                    .then(|| pair(h.inst, h.loc))
            })
            .collect();
        pairs.sort_unstable();
        let mut out = Vec::new();
        let mut i = 0;
        while i < pairs.len() {
            let mut j = i;
            while j < pairs.len() && pairs[j] == pairs[i] {
                j += 1;
            }
            let (inst, _) = unpair(pairs[i]);
            if j - i == self.instance(inst).workers.len() {
                out.push(pairs[i]);
            }
            i = j;
        }
        out.into_boxed_slice()
    }

    fn recompute_covered(&mut self) {
        for s in 1..self.sets.len() {
            if !self.sets[s].holders.is_empty() {
                let cov = self.covered_of(&self.sets[s].holders);
                self.sets[s].covered = cov;
            }
        }
    }

    // ---- holder sets -------------------------------------------------------------------

    pub fn set(&self, s: SetIx) -> &HolderSet {
        &self.sets[s.ix()]
    }

    /// Intern a sorted, distinct holder list.
    pub fn intern_set(&mut self, holders: Vec<HolderIx>) -> SetIx {
        if holders.is_empty() {
            return SetIx::EMPTY;
        }
        if let Some(s) = self.set_ix.get(holders.as_slice()) {
            return *s;
        }
        let holders = holders.into_boxed_slice();
        let set = HolderSet {
            covered: self.covered_of(&holders),
            holders: holders.clone(),
            refs: 0,
        };
        let s = match self.free_sets.pop() {
            Some(i) => {
                self.sets[i as usize] = set;
                SetIx(i)
            }
            None => {
                self.sets.push(set);
                SetIx((self.sets.len() - 1) as u32)
            }
        };
        self.set_ix.insert(holders, s);
        self.dead_sets += 1;
        s
    }

    /// The set `s ∪ {h}` (cached).
    pub fn with_holder(&mut self, s: SetIx, h: HolderIx) -> SetIx {
        if let Some(t) = self.add_cache.get(&(s.0, h.0)) {
            return *t;
        }
        let cur = &self.sets[s.ix()].holders;
        let t = match cur.binary_search(&h) {
            Ok(_) => s,
            Err(pos) => {
                let mut v = Vec::with_capacity(cur.len() + 1);
                v.extend_from_slice(&cur[..pos]);
                v.push(h);
                v.extend_from_slice(&cur[pos..]);
                self.intern_set(v)
            }
        };
        self.add_cache.insert((s.0, h.0), t);
        t
    }

    /// The set `s \ {h}` (cached).
    pub fn without_holder(&mut self, s: SetIx, h: HolderIx) -> SetIx {
        if let Some(t) = self.del_cache.get(&(s.0, h.0)) {
            return *t;
        }
        let cur = &self.sets[s.ix()].holders;
        let t = match cur.binary_search(&h) {
            Err(_) => s,
            Ok(pos) => {
                let mut v = cur.to_vec();
                v.remove(pos);
                self.intern_set(v)
            }
        };
        self.del_cache.insert((s.0, h.0), t);
        t
    }

    /// The set `s` minus every holder in the sorted list `drop`.
    pub fn without_holders(&mut self, s: SetIx, drop: &[HolderIx]) -> SetIx {
        let cur = &self.sets[s.ix()].holders;
        if !cur.iter().any(|h| drop.binary_search(h).is_ok()) {
            return s;
        }
        let v: Vec<HolderIx> = cur
            .iter()
            .copied()
            .filter(|h| drop.binary_search(h).is_err())
            .collect();
        self.intern_set(v)
    }

    #[inline]
    pub fn incref(&mut self, s: SetIx) {
        if s != SetIx::EMPTY {
            let set = &mut self.sets[s.ix()];
            if set.refs == 0 {
                self.dead_sets -= 1;
            }
            set.refs += 1;
        }
    }

    pub fn incref_by(&mut self, s: SetIx, n: u64) {
        if s != SetIx::EMPTY && n > 0 {
            let set = &mut self.sets[s.ix()];
            if set.refs == 0 {
                self.dead_sets -= 1;
            }
            set.refs += n;
        }
    }

    #[inline]
    pub fn decref(&mut self, s: SetIx) {
        if s != SetIx::EMPTY {
            let set = &mut self.sets[s.ix()];
            set.refs -= 1;
            if set.refs == 0 {
                self.dead_sets += 1;
            }
        }
    }

    #[inline]
    pub fn add_count(&mut self, h: HolderIx, n: u64) {
        if let Some(holder) = self.holders[h.ix()].as_mut() {
            holder.count += n;
        }
        self.holdings += n;
    }

    #[inline]
    pub fn sub_count(&mut self, h: HolderIx, n: u64) {
        if let Some(holder) = self.holders[h.ix()].as_mut() {
            holder.count -= n;
        }
        self.holdings -= n;
    }

    /// Holders matching a predicate, sorted.
    pub fn holders_where(&self, mut pred: impl FnMut(&Holder) -> bool) -> Vec<HolderIx> {
        self.holders
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().filter(|h| pred(h)).map(|_| HolderIx(i as u32)))
            .collect()
    }

    /// Collect garbage when dead sets pile up. Deterministic (depends only on state).
    pub fn maybe_gc(&mut self) {
        if self.dead_sets > 256 && self.dead_sets > self.live_sets() {
            self.gc();
        }
    }

    pub fn live_sets(&self) -> usize {
        self.set_ix.len() - self.dead_sets
    }

    /// Free dead sets, unused holders, locations and instances; drop the transition caches.
    pub fn gc(&mut self) {
        self.add_cache = FxMap::default();
        self.del_cache = FxMap::default();
        for s in 1..self.sets.len() {
            let set = &self.sets[s];
            if set.refs == 0 && !set.holders.is_empty() {
                let holders = std::mem::take(&mut self.sets[s].holders);
                self.sets[s].covered = Box::default();
                self.set_ix.remove(&holders);
                self.free_sets.push(s as u32);
            }
        }
        self.dead_sets = 0;
        let mut loc_used = vec![false; self.locations.len()];
        let mut inst_used = vec![false; self.instances.len()];
        for h in 0..self.holders.len() {
            if let Some(holder) = &self.holders[h] {
                if holder.count == 0 {
                    self.holder_ix
                        .remove(&(holder.inst.0, holder.worker, holder.loc.0));
                    self.holders[h] = None;
                    self.free_holders.push(h as u32);
                } else {
                    loc_used[holder.loc.ix()] = true;
                    inst_used[holder.inst.ix()] = true;
                }
            }
        }
        for (l, used) in loc_used.into_iter().enumerate() {
            if !used {
                if let Some(loc) = self.locations[l].take() {
                    self.location_ix.remove(&loc.name);
                    self.free_locations.push(l as u32);
                }
            }
        }
        for (i, used) in inst_used.into_iter().enumerate() {
            let unused = !used
                && self.instances[i]
                    .as_ref()
                    .is_some_and(|inst| inst.workers.is_empty());
            if unused {
                if let Some(inst) = self.instances[i].take() {
                    self.instance_ix.remove(&inst.name);
                    self.free_instances.push(i as u32);
                }
            }
        }
    }

    /// Heap bytes (approximate for the hash maps: buckets times entry size).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        fn map<K, V>(m: &FxMap<K, V>) -> usize {
            m.capacity() * (size_of::<K>() + size_of::<V>() + 1)
        }
        let mut b = self.instances.capacity() * size_of::<Option<Instance>>()
            + self.locations.capacity() * size_of::<Option<Location>>()
            + self.holders.capacity() * size_of::<Option<Holder>>()
            + self.sets.capacity() * size_of::<HolderSet>()
            + map(&self.instance_ix)
            + map(&self.location_ix)
            + map(&self.holder_ix)
            + map(&self.set_ix)
            + map(&self.add_cache)
            + map(&self.del_cache)
            + (self.free_instances.capacity()
                + self.free_locations.capacity()
                + self.free_holders.capacity()
                + self.free_sets.capacity())
                * 4;
        for inst in self.instances.iter().flatten() {
            b += inst.name.len() + 16 + inst.workers.capacity() * 4;
        }
        for loc in self.locations.iter().flatten() {
            b += loc.name.len() + 16;
        }
        for s in &self.sets {
            // each holder list is stored twice: in the set and as the intern map key
            b += s.holders.len() * 8 + s.covered.len() * 8;
        }
        b
    }

    /// Structural self-check of the registry (the table-dependent parts are checked by the
    /// index). `refs` and `counts` are the recomputed per-set / per-holder chunk counts.
    pub fn check(&self, refs: &[u64], counts: &[u64]) -> Result<(), String> {
        for (i, inst) in self.instances.iter().enumerate() {
            if let Some(inst) = inst {
                if self.instance_ix.get(&inst.name) != Some(&InstanceIx(i as u32)) {
                    return Err(format!("instance {:?} not interned", inst.name));
                }
                if !inst.workers.windows(2).all(|w| w[0] < w[1]) {
                    return Err(format!("workers of {:?} not sorted", inst.name));
                }
            }
        }
        if self.instance_ix.len() != self.instances.iter().flatten().count() {
            return Err("instance intern map size".into());
        }
        for (l, loc) in self.locations.iter().enumerate() {
            if let Some(loc) = loc {
                if self.location_ix.get(&loc.name) != Some(&LocationIx(l as u32)) {
                    return Err(format!("location {:?} not interned", loc.name));
                }
            }
        }
        if self.location_ix.len() != self.locations.iter().flatten().count() {
            return Err("location intern map size".into());
        }
        let mut total = 0;
        for (h, holder) in self.holders.iter().enumerate() {
            let Some(holder) = holder else { continue };
            if self
                .instances
                .get(holder.inst.ix())
                .and_then(|i| i.as_ref())
                .is_none()
                || self
                    .locations
                    .get(holder.loc.ix())
                    .and_then(|l| l.as_ref())
                    .is_none()
            {
                return Err(format!("holder {h} refers to a freed instance or location"));
            }
            if self
                .holder_ix
                .get(&(holder.inst.0, holder.worker, holder.loc.0))
                != Some(&HolderIx(h as u32))
            {
                return Err(format!("holder {h} not interned"));
            }
            let want = counts.get(h).copied().unwrap_or(0);
            if holder.count != want {
                return Err(format!(
                    "holder {h} count {} but holds {want} chunks",
                    holder.count
                ));
            }
            if holder.count > 0 && !self.is_live_worker(holder.inst, holder.worker) {
                return Err(format!(
                    "holder {h} holds chunks but its worker is not live"
                ));
            }
            total += holder.count;
        }
        for (h, c) in counts.iter().enumerate() {
            if *c > 0 && self.holders.get(h).and_then(|x| x.as_ref()).is_none() {
                return Err(format!("freed holder {h} holds {c} chunks"));
            }
        }
        if self.holder_ix.len() != self.holders.iter().flatten().count() {
            return Err("holder intern map size".into());
        }
        if total != self.holdings {
            return Err(format!(
                "holdings {} but holders sum to {total}",
                self.holdings
            ));
        }
        if !self.sets[0].holders.is_empty() || self.sets[0].refs != 0 {
            return Err("set 0 must stay the empty set".into());
        }
        let mut dead = 0;
        let free: std::collections::HashSet<u32> = self.free_sets.iter().copied().collect();
        if free.len() != self.free_sets.len() {
            return Err("a set is on the free list twice".into());
        }
        for (s, set) in self.sets.iter().enumerate().skip(1) {
            let want = refs.get(s).copied().unwrap_or(0);
            if set.refs != want {
                return Err(format!(
                    "set {s} refs {} but {want} chunks use it",
                    set.refs
                ));
            }
            if set.holders.is_empty() {
                if set.refs != 0 || !free.contains(&(s as u32)) {
                    return Err(format!("freed set {s} in use or not on the free list"));
                }
                continue;
            }
            if set.refs == 0 {
                dead += 1;
            }
            if self.set_ix.get(&set.holders) != Some(&SetIx(s as u32)) {
                return Err(format!("set {s} not interned"));
            }
            if !set.holders.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!("set {s} holders not sorted and distinct"));
            }
            for h in set.holders.iter() {
                if self.holders.get(h.ix()).and_then(|x| x.as_ref()).is_none() {
                    return Err(format!("set {s} holds freed holder {}", h.0));
                }
            }
            if set.covered != self.covered_of(&set.holders) {
                return Err(format!("set {s} covered pairs stale"));
            }
        }
        if dead != self.dead_sets {
            return Err(format!("dead set count {} but {dead} dead", self.dead_sets));
        }
        if self.set_ix.len()
            != self
                .sets
                .iter()
                .skip(1)
                .filter(|s| !s.holders.is_empty())
                .count()
        {
            return Err("set intern map size".into());
        }
        let live = |i: usize| {
            self.sets
                .get(i)
                .is_some_and(|x| i == 0 || !x.holders.is_empty())
        };
        for (add, cache) in [(true, &self.add_cache), (false, &self.del_cache)] {
            for ((s, h), t) in cache.iter() {
                if !live(*s as usize) || !live(t.ix()) {
                    return Err(format!(
                        "transition ({s}, {h}) -> {} refers to a freed set",
                        t.0
                    ));
                }
                let mut want: Vec<HolderIx> = self.sets[*s as usize].holders.to_vec();
                match (add, want.binary_search(&HolderIx(*h))) {
                    (true, Err(pos)) => want.insert(pos, HolderIx(*h)),
                    (false, Ok(pos)) => {
                        want.remove(pos);
                    }
                    _ => {}
                }
                if *self.sets[t.ix()].holders != *want {
                    return Err(format!("cached transition ({s}, {h}) -> {} is wrong", t.0));
                }
            }
        }
        Ok(())
    }

    /// Feed every field into `f` in a fixed order (for the two-copies digest).
    pub fn digest_into(&self, f: &mut impl FnMut(&[u8])) {
        for inst in &self.instances {
            match inst {
                Some(i) => {
                    f(i.name.as_bytes());
                    f(&(i.name.len() as u64).to_le_bytes());
                    for w in &i.workers {
                        f(&w.to_le_bytes());
                    }
                    f(b"|");
                }
                None => f(b"-"),
            }
        }
        for loc in &self.locations {
            match loc {
                Some(l) => {
                    f(l.name.as_bytes());
                    f(&(l.name.len() as u64).to_le_bytes());
                }
                None => f(b"-"),
            }
        }
        for h in &self.holders {
            match h {
                Some(h) => {
                    f(&h.inst.0.to_le_bytes());
                    f(&h.worker.to_le_bytes());
                    f(&h.loc.0.to_le_bytes());
                    f(&h.count.to_le_bytes());
                }
                None => f(b"-"),
            }
        }
        for s in &self.sets {
            f(&(s.holders.len() as u64).to_le_bytes());
            for h in s.holders.iter() {
                f(&h.0.to_le_bytes());
            }
            for p in s.covered.iter() {
                f(&p.to_le_bytes());
            }
            f(&s.refs.to_le_bytes());
        }
        f(&self.holdings.to_le_bytes());
        f(&(self.dead_sets as u64).to_le_bytes());
    }
}
