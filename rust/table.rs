//! A compact open-addressing map from chunk key (u64) to holder-set id (u32).
//!
//! Each slot holds its key and value side by side (12 bytes, packed), probed linearly, so a
//! probe reads one cache line, rarely two. The home slot is `(mix(key) * capacity) >> 64`
//! (multiplicative range reduction), so the capacity need not be a power of two and the table
//! grows by 1.5x. Key 0 marks an empty slot; the real key 0 (possible for user-supplied keys)
//! lives in a side slot, so no key is ever rehashed or refused. Deletion shifts the following
//! entries back (no tombstones), so every probe chain stays gap-free. Large slot arrays ask
//! for transparent huge pages (crate::memory).
//!
//! A large table resizes incrementally: the new array is allocated and every following write
//! first moves a few whole runs of the old one into it (`Drain`), so no single write pays for
//! rehashing millions of keys (a replica applying a batch would stall for tens of ms).

use crate::memory;

/// The key value that marks an empty slot.
const EMPTY: u64 = 0;
/// Grow when `len > capacity * MAX_LOAD`.
const MAX_LOAD_NUM: usize = 4;
const MAX_LOAD_DEN: usize = 5;
const MIN_CAPACITY: usize = 16;

/// One slot: packed to 12 bytes (fields are read and written by value, never borrowed).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed(4))]
struct Slot {
    key: u64,
    val: u32,
}

const EMPTY_SLOT: Slot = Slot { key: EMPTY, val: 0 };

/// `cap` empty slots. An empty slot is all zero bytes, so they come from zeroed memory (fresh
/// pages are not written at all) with the huge-page hint given before the first write.
fn empty_slots(cap: usize) -> Vec<Slot> {
    if cap == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<Slot>(cap).expect("slot array size overflows");
    // SAFETY: the layout is non-zero-sized; an all-zero `Slot` is EMPTY_SLOT (two integers), so
    // every element is initialised; the Vec takes the allocation with the layout it was made
    // with (capacity `cap` of `Slot`).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut Slot;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        memory::advise_huge_pages(ptr as *const u8, layout.size());
        Vec::from_raw_parts(ptr, cap, cap)
    }
}

#[inline]
fn mix(key: u64) -> u64 {
    // Keys from chunk_hashes are already uniform; this spreads user-supplied small or
    // sequential keys over the high bits that the range reduction uses.
    (key ^ (key >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Where a key is, or where it would go.
enum Probe {
    Found(usize),
    Vacant(usize),
}

/// One open-addressing array: slots, how many hold a key, and the probing rules.
#[derive(Clone, Debug, Default)]
struct Slots {
    slots: Vec<Slot>,
    len: usize,
}

impl Slots {
    fn with_capacity(cap: usize) -> Self {
        Slots {
            slots: empty_slots(cap),
            len: 0,
        }
    }

    #[inline]
    fn cap(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        ((mix(key) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    #[inline]
    fn key_at(&self, i: usize) -> u64 {
        self.slots[i].key
    }

    #[inline]
    fn val_at(&self, i: usize) -> u32 {
        self.slots[i].val
    }

    #[inline]
    fn set(&mut self, i: usize, key: u64, val: u32) {
        self.slots[i] = Slot { key, val };
    }

    /// Start loading `key`'s home line and, for an insert (`lines` 2), the next one too.
    #[inline]
    fn prefetch(&self, key: u64, lines: usize) {
        if !self.slots.is_empty() {
            let home = self.slots.as_ptr().wrapping_add(self.home(key));
            for line in 0..lines {
                memory::prefetch(home.wrapping_byte_add(64 * line));
            }
        }
    }

    /// Requires a nonzero key and at least one empty slot.
    #[inline]
    fn probe(&self, key: u64) -> Probe {
        let mut i = self.home(key);
        loop {
            let k = self.key_at(i);
            if k == key {
                return Probe::Found(i);
            }
            if k == EMPTY {
                return Probe::Vacant(i);
            }
            i = self.next(i);
        }
    }

    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            Probe::Found(i) => Some(self.val_at(i)),
            Probe::Vacant(_) => None,
        }
    }

    /// Store a key known to be absent; the array must keep an empty slot afterwards.
    fn put_new(&mut self, key: u64, val: u32) {
        let Probe::Vacant(i) = self.probe(key) else {
            unreachable!("key stored twice")
        };
        self.set(i, key, val);
        self.len += 1;
    }

    /// Backward-shift deletion: pull later entries of the run into the hole when their home
    /// allows it, so no probe chain ever crosses an empty slot.
    fn remove_at(&mut self, slot: usize) {
        let cap = self.slots.len();
        let mut hole = slot;
        let mut j = slot;
        loop {
            j = self.next(j);
            let k = self.key_at(j);
            if k == EMPTY {
                break;
            }
            let h = self.home(k);
            let dist_home = if j >= h { j - h } else { j + cap - h };
            let dist_hole = if j >= hole { j - hole } else { j + cap - hole };
            if dist_home >= dist_hole {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = EMPTY_SLOT;
        self.len -= 1;
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.slots
            .iter()
            .map(|s| (s.key, s.val))
            .filter(|(k, _)| *k != EMPTY)
    }

    /// Every key reachable from its home without crossing an empty slot, once; the count.
    fn check(&self) -> Result<(), String> {
        let cap = self.slots.len();
        let mut n = 0;
        for j in 0..cap {
            let k = self.key_at(j);
            if k == EMPTY {
                continue;
            }
            n += 1;
            let mut i = self.home(k);
            while i != j {
                if self.key_at(i) == EMPTY {
                    return Err(format!("probe chain of key {k:#x} broken at slot {i}"));
                }
                if self.key_at(i) == k {
                    return Err(format!("key {k:#x} stored twice"));
                }
                i = self.next(i);
            }
        }
        if n != self.len {
            return Err(format!("table len {} but {} keys stored", self.len, n));
        }
        if cap > 0 && n >= cap {
            return Err("table has no empty slot".into());
        }
        Ok(())
    }
}

/// An array being emptied into a new one a little at every write (incremental resize).
///
/// Homes are monotone in `mix(key)` and runs never cross an empty slot, so the keys whose old
/// home lies in the cyclic range `start ..= cursor` (with `cursor` on an empty slot) form
/// whole runs: those are in the new array, every other key is still here. `start` is an empty
/// slot when the drain begins, and the cursor walks once around the array.
#[derive(Clone, Debug)]
struct Drain {
    from: Slots,
    start: usize,
    /// Slots the cursor has advanced from `start`.
    advanced: usize,
}

impl Drain {
    fn new(from: Slots) -> Self {
        let start = (0..from.cap())
            .find(|&i| from.key_at(i) == EMPTY)
            .expect("a table keeps an empty slot");
        Drain {
            from,
            start,
            advanced: 0,
        }
    }

    /// Whether `key` belongs in the new array already.
    #[inline]
    fn moved(&self, key: u64) -> bool {
        let h = self.from.home(key);
        let dist = if h >= self.start {
            h - self.start
        } else {
            h + self.from.cap() - self.start
        };
        dist <= self.advanced
    }

    /// Move whole runs until at least `budget` slots were passed or the array is empty.
    fn step(&mut self, into: &mut Slots, budget: usize) {
        let cap = self.from.cap();
        let mut cursor = (self.start + self.advanced) % cap;
        let mut passed = 0;
        while passed < budget && self.from.len > 0 {
            let mut j = self.from.next(cursor);
            while self.from.key_at(j) != EMPTY {
                let slot = self.from.slots[j];
                into.put_new(slot.key, slot.val);
                self.from.slots[j] = EMPTY_SLOT;
                self.from.len -= 1;
                j = self.from.next(j);
            }
            let dist = if j > cursor {
                j - cursor
            } else {
                j + cap - cursor
            };
            self.advanced += dist;
            passed += dist;
            cursor = j;
        }
    }
}

#[derive(Clone, Debug)]
pub struct Table {
    cur: Slots,
    /// The previous array while it drains into `cur` (incremental resize).
    drain: Option<Box<Drain>>,
    /// Value of the real key 0, if present.
    zero: Option<u32>,
    /// Writes whose share of the drain `prepay` has done already.
    prepaid: usize,
    /// Arrays at least this large resize incrementally, this many slots per write
    /// (INCREMENTAL_MIN_CAPACITY, DRAIN_STEP; tests lower them).
    incremental_min: usize,
    drain_step: usize,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            cur: Slots::default(),
            drain: None,
            zero: None,
            prepaid: 0,
            incremental_min: INCREMENTAL_MIN_CAPACITY,
            drain_step: DRAIN_STEP,
        }
    }
}

/// Arrays at least this large resize incrementally; smaller ones at once.
const INCREMENTAL_MIN_CAPACITY: usize = 1 << 12;
/// Slots drained per write: a drain ends within `capacity / DRAIN_STEP` writes, long before
/// the old array (load ≤ 0.8 + 1/DRAIN_STEP) or the new one can fill. Small, so that a drain's
/// work is spread thin: a replica following a log at 10 k writes/s then never falls behind
/// during one (benchmarks/replicas.py on a busy two-core host: lag p99 124 ms with 1,024, 5 ms
/// with 32). Batches pay for their writes' share at once (`prepay`), which keeps bulk ingest
/// within a few percent of what 1,024 gives.
const DRAIN_STEP: usize = 32;

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    #[inline]
    pub fn len(&self) -> usize {
        self.entries() + usize::from(self.zero.is_some())
    }

    /// Keys in the arrays (the side slot not counted).
    #[inline]
    fn entries(&self) -> usize {
        self.cur.len + self.drain.as_ref().map_or(0, |d| d.from.len)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots in both arrays while a resize is under way.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.cur.cap() + self.drain.as_ref().map_or(0, |d| d.from.cap())
    }

    /// Heap bytes held by this table.
    pub fn heap_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<Slot>()
    }

    /// The array that holds (or would hold) `key`.
    #[inline]
    fn array_of(&self, key: u64) -> &Slots {
        match &self.drain {
            Some(d) if !d.moved(key) => &d.from,
            _ => &self.cur,
        }
    }

    /// Start loading `key`'s home slot, for a `get` or `update` of it a little later.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        self.prefetch_lines(key, 1);
    }

    /// Like `prefetch`, for an update that may insert `key`: a new key's probe runs on to the
    /// first empty slot (~5 slots at load 0.67, 60 bytes), often into the next cache line, so
    /// that line is loaded too (measured: from-empty batch writes −18 %; lookups, whose keys
    /// sit near their home, were slower with it).
    #[inline]
    pub fn prefetch_insert(&self, key: u64) {
        self.prefetch_lines(key, 2);
    }

    #[inline]
    fn prefetch_lines(&self, key: u64, lines: usize) {
        if self.drain.is_none() {
            return self.cur.prefetch(key, lines); // the common case, kept to one test
        }
        self.array_of(key).prefetch(key, lines);
    }

    #[inline]
    pub fn get(&self, key: u64) -> Option<u32> {
        if key == EMPTY {
            return self.zero;
        }
        if self.drain.is_none() {
            return self.cur.get(key);
        }
        self.array_of(key).get(key)
    }

    /// One probe that reads the current value (if any) and stores what `f` returns:
    /// `Some(v)` inserts or overwrites, `None` removes. Returns the old value.
    #[inline]
    pub fn update(&mut self, key: u64, f: impl FnOnce(Option<u32>) -> Option<u32>) -> Option<u32> {
        if key == EMPTY {
            let old = self.zero;
            self.zero = f(old);
            return old;
        }
        if self.cur.cap() == 0 {
            if let Some(v) = f(None) {
                self.insert_new(key, v);
            }
            return None;
        }
        let in_old = self.drain.is_some() && self.drain_before_write(key);
        let arr = self.array_mut(in_old);
        match arr.probe(key) {
            Probe::Found(i) => {
                let old = arr.val_at(i);
                match f(Some(old)) {
                    Some(v) => arr.slots[i].val = v,
                    None => {
                        arr.remove_at(i);
                        // that may have been the old array's last key: the resize is done
                        if matches!(&self.drain, Some(d) if d.from.len == 0) {
                            self.drain = None;
                        }
                        self.maybe_shrink();
                    }
                }
                Some(old)
            }
            Probe::Vacant(i) => {
                if let Some(v) = f(None) {
                    // the old array takes keys of its undrained runs while it has room to spare
                    let fits = if in_old {
                        (arr.len + 2) * 20 <= arr.cap() * 19
                    } else {
                        (self.entries() + 1) * MAX_LOAD_DEN <= self.cur.cap() * MAX_LOAD_NUM
                    };
                    if fits {
                        let arr = self.array_mut(in_old);
                        arr.set(i, key, v);
                        arr.len += 1;
                    } else {
                        self.finish_drain();
                        self.insert_new(key, v);
                    }
                }
                None
            }
        }
    }

    /// A write's share of the resize under way (unless prepaid); then whether `key` belongs in
    /// the old array.
    #[inline(never)]
    fn drain_before_write(&mut self, key: u64) -> bool {
        if let Some(d) = &mut self.drain {
            if self.prepaid > 0 {
                self.prepaid -= 1;
            } else {
                d.step(&mut self.cur, self.drain_step);
                if d.from.len == 0 {
                    self.drain = None;
                }
            }
        }
        matches!(&self.drain, Some(d) if !d.moved(key))
    }

    /// The old array (`in_old`, a resize under way) or the current one.
    #[inline]
    fn array_mut(&mut self, in_old: bool) -> &mut Slots {
        match &mut self.drain {
            Some(d) if in_old => &mut d.from,
            _ => &mut self.cur,
        }
    }

    pub fn insert(&mut self, key: u64, val: u32) -> Option<u32> {
        self.update(key, |_| Some(val))
    }

    pub fn remove(&mut self, key: u64) -> Option<u32> {
        self.update(key, |_| None)
    }

    /// Insert a key known to be absent, growing first if needed.
    fn insert_new(&mut self, key: u64, val: u32) {
        if (self.entries() + 1) * MAX_LOAD_DEN > self.cur.cap() * MAX_LOAD_NUM {
            let grown = (self.cur.cap() + self.cur.cap() / 2).max(MIN_CAPACITY);
            self.resize(grown);
        }
        match &mut self.drain {
            Some(d) if !d.moved(key) => d.from.put_new(key, val),
            _ => self.cur.put_new(key, val),
        }
    }

    /// Do the drain's share of the next `writes` writes at once: one streaming pass instead of
    /// many short ones between the writes' random accesses. A resize that starts during those
    /// writes is drained by each write again.
    pub fn prepay(&mut self, writes: usize) {
        if let Some(d) = &mut self.drain {
            d.step(&mut self.cur, writes.saturating_mul(self.drain_step));
            if d.from.len == 0 {
                self.drain = None;
            } else {
                self.prepaid = writes;
            }
        }
    }

    /// After a removal: shrink below load 0.25 (not while a resize is under way).
    fn maybe_shrink(&mut self) {
        let cap = self.cur.cap();
        if self.drain.is_none() && self.cur.len * 4 < cap && cap > MIN_CAPACITY {
            self.resize((self.cur.len * 2).max(MIN_CAPACITY));
        }
    }

    /// Finish a resize under way at once.
    fn finish_drain(&mut self) {
        if let Some(mut d) = self.drain.take() {
            d.step(&mut self.cur, usize::MAX);
        }
    }

    /// Move to an array of `cap` slots (`cap` must exceed the entries): at once for a small
    /// table, else a little at each following write.
    fn resize(&mut self, cap: usize) {
        self.finish_drain();
        self.prepaid = 0;
        let old = std::mem::replace(&mut self.cur, Slots::with_capacity(cap));
        if old.cap() < self.incremental_min || old.len == 0 {
            for (k, v) in old.iter() {
                self.cur.put_new(k, v);
            }
        } else {
            // one step at once, so that keys the old array takes afterwards, which may spill
            // past `start`, stay behind the cursor's empty slot
            let mut d = Drain::new(old);
            d.step(&mut self.cur, self.drain_step);
            self.drain = (d.from.len > 0).then_some(Box::new(d));
        }
    }

    /// Map every value through `f` (`None` removes the entry), rebuilding once at the end if
    /// anything was removed. Iterative, O(capacity).
    pub fn retain_map(&mut self, mut f: impl FnMut(u64, u32) -> Option<u32>) {
        self.finish_drain();
        if let Some(v) = self.zero {
            self.zero = f(EMPTY, v);
        }
        let mut removed = 0;
        for slot in self.cur.slots.iter_mut() {
            let (k, v) = (slot.key, slot.val);
            if k != EMPTY {
                match f(k, v) {
                    Some(v) => slot.val = v,
                    None => {
                        *slot = EMPTY_SLOT;
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            // emptied slots break probe chains: rebuild from what is left
            let keep = self.cur.len - removed;
            let cap = if keep == 0 {
                0
            } else {
                (keep * 2).max(MIN_CAPACITY)
            };
            let old = std::mem::replace(&mut self.cur, Slots::with_capacity(cap));
            for (k, v) in old.iter() {
                self.cur.put_new(k, v);
            }
        }
    }

    /// Every (key, value): the side slot, the new array, then what has not drained yet.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.zero
            .map(|v| (EMPTY, v))
            .into_iter()
            .chain(self.cur.iter())
            .chain(self.drain.iter().flat_map(|d| d.from.iter()))
    }

    /// Remove everything and free the arrays.
    pub fn clear(&mut self) {
        *self = Table::default();
    }

    /// Pre-size for `n` keys (used when loading a snapshot).
    pub fn with_capacity_for(n: usize) -> Self {
        let cap = if n == 0 {
            0
        } else {
            (n * MAX_LOAD_DEN / MAX_LOAD_NUM + 1)
                .max(n * 3 / 2)
                .max(MIN_CAPACITY)
        };
        Table {
            cur: Slots::with_capacity(cap),
            ..Table::default()
        }
    }

    /// Check the structure: each array's count and probe chains, and during a resize that each
    /// key is in the array its old home says.
    pub fn check(&self) -> Result<(), String> {
        self.cur.check()?;
        if let Some(d) = &self.drain {
            d.from.check()?;
            if d.from.len == 0 {
                return Err("an empty array is still draining".into());
            }
            let cursor = (d.start + d.advanced) % d.from.cap();
            if d.from.key_at(cursor) != EMPTY {
                return Err(format!("the drain's cursor slot {cursor} holds a key"));
            }
            if let Some((k, _)) = self.cur.iter().find(|(k, _)| !d.moved(*k)) {
                return Err(format!("key {k:#x} moved before its run"));
            }
            if let Some((k, _)) = d.from.iter().find(|(k, _)| d.moved(*k)) {
                return Err(format!("key {k:#x} left behind by the drain"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn against_hashmap() {
        let mut t = Table::new();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut x: u64 = 12345;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // small key space (including 0) to hit updates, removals and the side slot
            let k = x % 3000;
            if x.is_multiple_of(3) {
                assert_eq!(t.remove(k), m.remove(&k));
            } else {
                assert_eq!(t.insert(k, step), m.insert(k, step));
            }
            if step % 10_000 == 0 {
                t.check().unwrap();
            }
        }
        t.check().unwrap();
        assert_eq!(t.len(), m.len());
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(*v));
        }
        t.retain_map(|k, v| {
            if k.is_multiple_of(2) {
                None
            } else {
                Some(v + 1)
            }
        });
        t.check().unwrap();
        for (k, v) in &m {
            assert_eq!(
                t.get(*k),
                if k.is_multiple_of(2) {
                    None
                } else {
                    Some(v + 1)
                }
            );
        }
        let mut seen: Vec<u64> = t.iter().map(|(k, _)| k).collect();
        seen.sort_unstable();
        let mut want: Vec<u64> = m.keys().copied().filter(|k| !k.is_multiple_of(2)).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn sequential_keys_spread_and_shrink() {
        let mut t = Table::new();
        for k in 1..=100_000u64 {
            t.insert(k, k as u32);
        }
        t.check().unwrap();
        assert!(t.capacity() * 4 / 5 >= t.len());
        for k in 1..=100_000u64 {
            assert_eq!(t.remove(k), Some(k as u32));
        }
        t.check().unwrap();
        assert!(t.capacity() <= MIN_CAPACITY * 2);
    }

    /// A table whose drains take many writes (32 slots each), to exercise them.
    fn slow_draining() -> Table {
        Table {
            drain_step: 32,
            ..Table::default()
        }
    }

    /// xorshift64: reproducible keys for the tests below.
    fn next_rand(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn incremental_resize_against_hashmap() {
        // grow through several drains, then shrink through several, with reads, overwrites and
        // removals in between; the structure is checked while drains are under way
        let mut t = slow_draining();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut x: u64 = 99;
        let mut drains_seen = 0;
        for phase in 0..3u64 {
            for step in 0..300_000u32 {
                let r = next_rand(&mut x);
                let k = r % 400_000 + 1;
                // per phase: below `ins` inserts, below `rem` removes, else reads (of 10)
                let (ins, rem) = [(6, 8), (4, 8), (2, 9)][phase as usize];
                let was_draining = t.drain.is_some();
                let pick = (r >> 40) % 10;
                if pick < ins {
                    assert_eq!(t.insert(k, step), m.insert(k, step));
                } else if pick < rem {
                    assert_eq!(t.remove(k), m.remove(&k));
                } else {
                    assert_eq!(t.get(k), m.get(&k).copied());
                }
                if t.drain.is_some() && !was_draining {
                    drains_seen += 1;
                }
                if t.drain.is_some() != was_draining || step % 4_999 == 0 {
                    t.check().unwrap();
                    assert_eq!(t.len(), m.len());
                }
            }
        }
        assert!(
            drains_seen >= 4,
            "only {drains_seen} incremental resizes ran"
        );
        t.check().unwrap();
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(*v));
        }
        let mut seen: Vec<u64> = t.iter().map(|(k, _)| k).collect();
        seen.sort_unstable();
        let mut want: Vec<u64> = m.keys().copied().collect();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_drain_ends_within_its_budget() {
        // the resize's work is spread: each write drains t.drain_step slots or more, so the old
        // array is gone after at most old capacity / t.drain_step writes, and no write before
        // that finished it at once
        let mut t = slow_draining();
        let mut x: u64 = 7;
        let mut k = 0;
        while t.drain.is_none() || t.cur.cap() < 4 * INCREMENTAL_MIN_CAPACITY {
            k = next_rand(&mut x);
            t.insert(k, 1);
        }
        let old = &t.drain.as_ref().unwrap().from;
        let old_cap = old.cap();
        // a step ends at the end of a run, so it may pass one run beyond its budget
        let mut longest_run = 0;
        let mut run = 0;
        for i in 0..2 * old_cap {
            run = if old.key_at(i % old_cap) == EMPTY {
                0
            } else {
                run + 1
            };
            longest_run = longest_run.max(run);
        }
        let mut writes = 0;
        while t.drain.is_some() {
            let left = t.drain.as_ref().unwrap().from.len;
            t.insert(next_rand(&mut x), 2);
            writes += 1;
            if let Some(d) = &t.drain {
                assert!(d.from.len < left, "a write drained nothing");
                assert!(
                    left - d.from.len <= t.drain_step + longest_run,
                    "a write drained too much"
                );
            }
            t.check().unwrap();
        }
        assert!(
            writes <= old_cap / t.drain_step + 1,
            "{writes} writes for {old_cap} slots"
        );
        assert_eq!(t.get(k), Some(1));
    }

    #[test]
    fn keys_at_the_drain_boundaries() {
        // during a drain, insert keys whose old home is exactly the cursor's slot, the slot
        // after it, or just before the start (these spill over the start): each must stay
        // findable and in the array the boundary rule names
        let mut t = slow_draining();
        let mut x: u64 = 3;
        let mut inserted = Vec::new();
        while t.drain.is_none() || t.cur.cap() < 4 * INCREMENTAL_MIN_CAPACITY {
            let k = next_rand(&mut x);
            t.insert(k, 1);
            inserted.push(k);
        }
        let mut rounds = 0;
        while let Some(d) = &t.drain {
            // the insert drains first: aim at where its step leaves the cursor
            let (mut ahead, mut into) = ((**d).clone(), t.cur.clone());
            ahead.step(&mut into, t.drain_step);
            let cap = d.from.cap();
            let cursor = (ahead.start + ahead.advanced) % cap;
            let targets = [cursor, (cursor + 1) % cap, (d.start + cap - 1) % cap];
            for (n, target) in targets.into_iter().enumerate() {
                if n > 0 && t.drain.is_none() {
                    break;
                }
                let home_of = |k: u64| t.drain.as_ref().map_or(usize::MAX, |d| d.from.home(k));
                let k = loop {
                    let k = next_rand(&mut x);
                    if home_of(k) == target {
                        break k;
                    }
                };
                t.insert(k, 3);
                inserted.push(k);
                t.check().unwrap();
            }
            rounds += 1;
        }
        assert!(rounds > 10);
        t.check().unwrap();
        for k in &inserted {
            assert!(t.get(*k).is_some(), "key {k:#x} lost");
        }
    }

    #[test]
    fn prepaid_drains_against_hashmap() {
        // writes come in batches whose drain share is done up front (`prepay`), as the index
        // does per operation; resizes start inside batches too
        let mut t = slow_draining();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut x: u64 = 17;
        let mut drains = 0;
        for round in 0..3_000u32 {
            let r = next_rand(&mut x);
            let batch = 1 + (r % 300) as usize;
            t.prepay(batch);
            for _ in 0..batch {
                let r = next_rand(&mut x);
                let k = r % 200_000;
                let was = t.drain.is_some();
                if (r >> 50) % 8 < if round < 2_000 { 6 } else { 1 } {
                    assert_eq!(t.insert(k, round), m.insert(k, round));
                } else {
                    assert_eq!(t.remove(k), m.remove(&k));
                }
                drains += usize::from(!was && t.drain.is_some());
            }
            if round % 50 == 0 || (t.drain.is_some() && round % 7 == 0) {
                t.check().unwrap();
                assert_eq!(t.len(), m.len());
            }
        }
        assert!(drains >= 4, "only {drains} drains");
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(*v));
        }
    }

    #[test]
    fn many_small_drains_against_hashmap() {
        // tiny tables resize incrementally here, so a drain is nearly always under way: every
        // operation is checked against a HashMap, the structure after each; keys are drawn
        // from a small range (collisions, removals of keys still in the old array), with key 0,
        // retain_map and prepaid batches mixed in
        for (seed, min, range) in [
            (1u64, 16usize, 320u64),
            (2, 16, 640),
            (3, 16, 1_280),
            (4, 32, 1_280),
        ] {
            let mut t = Table {
                incremental_min: min,
                drain_step: 8,
                ..Table::default()
            };
            let mut m: HashMap<u64, u32> = HashMap::new();
            let mut x = seed;
            let mut drains = 0;
            for step in 0..100_000u32 {
                let r = next_rand(&mut x);
                let k = r % range;
                let was = t.drain.is_some();
                // grow for a while, then shrink, then mixed, in turn
                let insert_share = [8, 1, 5][(step / (3 * range as u32) % 3) as usize];
                match (r >> 32) % 16 {
                    0 => t.prepay((r >> 40) as usize % 40),
                    1 if step % 997 == 0 => {
                        t.retain_map(|k, v| (k % 3 != 0).then_some(v));
                        m.retain(|k, _| k % 3 != 0);
                    }
                    n if n < 2 + insert_share => assert_eq!(t.insert(k, step), m.insert(k, step)),
                    n if n < 12 => assert_eq!(t.remove(k), m.remove(&k)),
                    _ => assert_eq!(t.get(k), m.get(&k).copied()),
                }
                drains += usize::from(!was && t.drain.is_some());
                t.check().unwrap();
                assert_eq!(t.len(), m.len());
            }
            assert!(drains >= 20, "seed {seed}: only {drains} drains");
            for (k, v) in &m {
                assert_eq!(t.get(*k), Some(*v));
            }
        }
    }

    #[test]
    fn large_table_with_huge_page_hint() {
        // 12 MiB of slots: the hint covers several whole 2 MiB pages
        let n = 700_000u64;
        let mut t = Table::with_capacity_for(n as usize);
        assert!(t.heap_bytes() > 8 << 20);
        for k in 1..=n {
            t.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k as u32);
        }
        t.check().unwrap();
        for k in 1..=n {
            let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            t.prefetch(key);
            assert_eq!(t.get(key), Some(k as u32));
        }
        assert_eq!(std::mem::size_of::<Slot>(), 12);
    }

    #[test]
    fn removing_the_last_undrained_key_leaves_an_empty_drain() {
        // a write drains first, then removes a key that is still in the old array: when that
        // was the old array's last key, the drain stays with an empty array until the next write
        let mut t = slow_draining();
        let mut x: u64 = 11;
        let mut m: HashMap<u64, u32> = HashMap::new();
        while t.drain.is_none() {
            let k = next_rand(&mut x);
            t.insert(k, 1);
            m.insert(k, 1);
        }
        loop {
            let Some(d) = &t.drain else {
                panic!("drain ended without the case")
            };
            let (mut ahead, mut into) = ((**d).clone(), t.cur.clone());
            ahead.step(&mut into, t.drain_step);
            let left: Vec<u64> = ahead.from.iter().map(|(k, _)| k).collect();
            if left.len() == 1 {
                assert_eq!(t.remove(left[0]), m.remove(&left[0]));
                break;
            }
            // take a key that stays in the old array, to bring the count down
            let k = if left.is_empty() {
                next_rand(&mut x)
            } else {
                left[left.len() / 2]
            };
            assert_eq!(t.remove(k), m.remove(&k));
            t.check().unwrap();
        }
        assert_eq!(t.len(), m.len());
        t.check().unwrap();
    }
}
