//! A compact open-addressing map from chunk key (u64) to holder-set id (u32).
//!
//! Each slot holds its key and value side by side (12 bytes, packed), probed linearly, so a
//! probe reads one cache line, rarely two. The home slot is `(mix(key) * capacity) >> 64`
//! (multiplicative range reduction), so the capacity need not be a power of two and the table
//! grows by 1.5x. Key 0 marks an empty slot; the real key 0 (possible for user-supplied keys)
//! lives in a side slot, so no key is ever rehashed or refused. Deletion shifts the following
//! entries back (no tombstones), so every probe chain stays gap-free. Large slot arrays ask
//! for transparent huge pages (crate::memory).

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

#[derive(Clone, Debug, Default)]
pub struct Table {
    slots: Vec<Slot>,
    /// Entries in `slots` (the side slot not counted).
    len: usize,
    /// Value of the real key 0, if present.
    zero: Option<u32>,
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

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    #[inline]
    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Heap bytes held by this table.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
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

    /// Start loading `key`'s home slot, for a `get` or `update` of it a little later.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if !self.slots.is_empty() {
            memory::prefetch(self.slots.as_ptr().wrapping_add(self.home(key)));
        }
    }

    /// Requires a nonzero key and a table with at least one empty slot.
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
    pub fn get(&self, key: u64) -> Option<u32> {
        if key == EMPTY {
            return self.zero;
        }
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            Probe::Found(i) => Some(self.val_at(i)),
            Probe::Vacant(_) => None,
        }
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
        if self.slots.is_empty() {
            if let Some(v) = f(None) {
                self.insert_new(key, v);
            }
            return None;
        }
        match self.probe(key) {
            Probe::Found(i) => {
                let old = self.val_at(i);
                match f(Some(old)) {
                    Some(v) => self.slots[i].val = v,
                    None => self.remove_at(i),
                }
                Some(old)
            }
            Probe::Vacant(i) => {
                if let Some(v) = f(None) {
                    if (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM {
                        self.insert_new(key, v);
                    } else {
                        self.set(i, key, v);
                        self.len += 1;
                    }
                }
                None
            }
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
        if (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM {
            let grown = (self.slots.len() + self.slots.len() / 2).max(MIN_CAPACITY);
            self.resize(grown);
        }
        match self.probe(key) {
            Probe::Vacant(i) => {
                self.set(i, key, val);
                self.len += 1;
            }
            Probe::Found(i) => self.slots[i].val = val,
        }
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
        if self.len * 4 < cap && cap > MIN_CAPACITY {
            self.resize((self.len * 2).max(MIN_CAPACITY));
        }
    }

    /// Put every live slot of `old` into this table's (empty) slots.
    fn reinsert(&mut self, old: Vec<Slot>) {
        for slot in old {
            let (k, v) = (slot.key, slot.val);
            if k != EMPTY {
                let Probe::Vacant(i) = self.probe(k) else {
                    unreachable!("duplicate key during rehash")
                };
                self.set(i, k, v);
            }
        }
    }

    /// Rehash into exactly `cap` slots (`cap` must exceed `len`).
    fn resize(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.slots, empty_slots(cap));
        self.reinsert(old);
    }

    /// Map every value through `f` (`None` removes the entry), rebuilding once at the end if
    /// anything was removed. Iterative, O(capacity).
    pub fn retain_map(&mut self, mut f: impl FnMut(u64, u32) -> Option<u32>) {
        if let Some(v) = self.zero {
            self.zero = f(EMPTY, v);
        }
        let mut removed = 0;
        for slot in self.slots.iter_mut() {
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
            let keep = self.len - removed;
            self.len = keep;
            let cap = if keep == 0 {
                0
            } else {
                (keep * 2).max(MIN_CAPACITY)
            };
            let old = std::mem::replace(&mut self.slots, empty_slots(cap));
            self.reinsert(old);
        }
    }

    /// Every (key, value), in slot order (the side slot first).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.zero.map(|v| (EMPTY, v)).into_iter().chain(
            self.slots
                .iter()
                .map(|s| (s.key, s.val))
                .filter(|(k, _)| *k != EMPTY),
        )
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
            slots: empty_slots(cap),
            len: 0,
            zero: None,
        }
    }

    /// Check the structure: the count, the load bound, and that every key is reachable from its
    /// home slot without crossing an empty slot and appears once.
    pub fn check(&self) -> Result<(), String> {
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
}
