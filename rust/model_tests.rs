//! Property test: random operation sequences on the concurrent index against a naive model
//! (sets and loops, as tests/reference_model.py), with every invariant checked after each step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use proptest::prelude::*;

use crate::hash::chunk_hashes;
use crate::index::{Batch, Event, EventKind, Match, Op};
use crate::keyspace::KeySpace;
use crate::shared::SharedIndex;

const CHUNK: usize = 3;
const XXH3: KeySpace = KeySpace::Xxh3 { seed: 5 };
const LMCACHE: KeySpace = KeySpace::LmcacheBuiltin { none_hash: -5 };
const INSTANCES: [&str; 3] = ["A", "B", "C"];
const LOCATIONS: [&str; 4] = ["GPU", "LocalCPUBackend", "LocalDiskBackend", "remote"];

type Holder = (String, u32, String);

struct Model {
    space: KeySpace,
    workers: BTreeMap<String, BTreeSet<u32>>,
    holdings: HashMap<u64, BTreeSet<Holder>>,
}

fn rank(loc: &str) -> (u8, &str) {
    let r = match loc {
        "GPU" => 0,
        "LocalCPUBackend" => 1,
        "LocalDiskBackend" => 2,
        _ => 3,
    };
    (r, loc)
}

impl Model {
    fn new(space: KeySpace) -> Self {
        Model {
            space,
            workers: BTreeMap::new(),
            holdings: HashMap::new(),
        }
    }
    fn register(&mut self, i: &str, w: u32) {
        self.workers.entry(i.into()).or_default().insert(w);
    }
    fn admit(&mut self, i: &str, w: u32, l: &str, keys: &[u64]) -> u64 {
        self.register(i, w);
        let h: Holder = (i.into(), w, l.into());
        keys.iter()
            .filter(|k| self.holdings.entry(**k).or_default().insert(h.clone()))
            .count() as u64
    }
    fn evict(&mut self, i: &str, w: u32, l: &str, keys: &[u64]) -> u64 {
        let h: Holder = (i.into(), w, l.into());
        let mut n = 0;
        for k in keys {
            if let Some(held) = self.holdings.get_mut(k) {
                if held.remove(&h) {
                    n += 1;
                }
                if held.is_empty() {
                    self.holdings.remove(k);
                }
            }
        }
        n
    }
    fn drop_where(&mut self, pred: impl Fn(&Holder) -> bool) -> u64 {
        let mut n = 0;
        self.holdings.retain(|_, held| {
            let before = held.len();
            held.retain(|h| !pred(h));
            n += (before - held.len()) as u64;
            !held.is_empty()
        });
        n
    }
    fn remove_worker(&mut self, i: &str, w: u32) -> u64 {
        let n = self.drop_where(|h| h.0 == i && h.1 == w);
        if let Some(live) = self.workers.get_mut(i) {
            live.remove(&w);
            if live.is_empty() {
                self.workers.remove(i);
            }
        }
        n
    }
    fn clear(&mut self, i: &str, l: Option<&str>) -> u64 {
        self.drop_where(|h| h.0 == i && l.is_none_or(|l| h.2 == l))
    }
    fn lookup(&self, tokens: &[u32]) -> Vec<(String, String, u64)> {
        let keys = self.space.keys(tokens, CHUNK);
        let mut out = Vec::new();
        for (inst, live) in &self.workers {
            let mut locs: Vec<&str> = self
                .holdings
                .values()
                .flatten()
                .filter(|h| &h.0 == inst)
                .map(|h| h.2.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            locs.sort_by_key(|l| rank(l));
            let mut best: Option<(String, u64)> = None;
            for loc in locs {
                let mut matched = 0u64;
                for (i, k) in keys.iter().enumerate() {
                    let held = self.holdings.get(k);
                    let all = live.iter().all(|w| {
                        held.is_some_and(|h| h.contains(&(inst.clone(), *w, loc.to_string())))
                    });
                    if !all {
                        break;
                    }
                    matched += (tokens.len() - i * CHUNK).min(CHUNK) as u64;
                }
                if matched > 0 && best.as_ref().is_none_or(|b| matched > b.1) {
                    best = Some((loc.to_string(), matched));
                }
            }
            if let Some((l, n)) = best {
                out.push((inst.clone(), l, n));
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum TestOp {
    Admit(usize, u32, usize, Vec<u32>),
    AdmitKeys(usize, u32, usize, Vec<u32>, Vec<usize>),
    Evict(usize, u32, usize, Vec<u32>),
    EvictKeys(usize, u32, usize, Vec<u32>, Vec<usize>),
    /// (0 admit | 1 evict | 2 drop at location | 3 drop all, instance, worker, location, tokens)
    Batch(Vec<(u8, usize, u32, usize, Vec<u32>)>),
    Register(usize, u32),
    Remove(usize, u32),
    Clear(usize, Option<usize>),
    DumpLoad,
}

fn tokens() -> impl Strategy<Value = Vec<u32>> {
    // prefixes of a few bases, sometimes with the last token changed: prefixes are shared
    (0..3usize, 0..=15usize, proptest::option::of(0..9u32)).prop_map(|(b, n, tweak)| {
        let base: Vec<u32> = (0..15u32).map(|i| (i * (b as u32 + 1)) % 7).collect();
        let mut t = base[..n].to_vec();
        if let (Some(x), Some(last)) = (tweak, t.last_mut()) {
            *last = x;
        }
        t
    })
}

fn op() -> impl Strategy<Value = TestOp> {
    let i = 0..INSTANCES.len();
    let w = 0..3u32;
    let l = 0..LOCATIONS.len();
    let picks = proptest::collection::vec(0..5usize, 0..5);
    prop_oneof![
        6 => (i.clone(), w.clone(), l.clone(), tokens()).prop_map(|(i, w, l, t)| TestOp::Admit(i, w, l, t)),
        2 => (i.clone(), w.clone(), l.clone(), tokens(), picks.clone())
            .prop_map(|(i, w, l, t, p)| TestOp::AdmitKeys(i, w, l, t, p)),
        3 => (i.clone(), w.clone(), l.clone(), tokens()).prop_map(|(i, w, l, t)| TestOp::Evict(i, w, l, t)),
        2 => (i.clone(), w.clone(), l.clone(), tokens(), picks)
            .prop_map(|(i, w, l, t, p)| TestOp::EvictKeys(i, w, l, t, p)),
        2 => proptest::collection::vec((prop_oneof![4 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)], i.clone(), w.clone(), l.clone(), tokens()), 0..5)
            .prop_map(TestOp::Batch),
        1 => (i.clone(), w.clone()).prop_map(|(i, w)| TestOp::Register(i, w)),
        1 => (i.clone(), w.clone()).prop_map(|(i, w)| TestOp::Remove(i, w)),
        1 => (i, proptest::option::of(l)).prop_map(|(i, l)| TestOp::Clear(i, l)),
        1 => Just(TestOp::DumpLoad),
    ]
}

fn event(kind: EventKind, i: usize, w: u32, l: usize) -> Arc<Event> {
    Arc::new(Event {
        kind,
        instance: INSTANCES[i].into(),
        worker: w,
        location: LOCATIONS[l].into(),
        start: 0,
        end: 0,
    })
}

fn picked(keys: &[u64], picks: &[usize]) -> Vec<u64> {
    picks.iter().filter_map(|p| keys.get(*p).copied()).collect()
}

fn as_tuples(v: Vec<Match>) -> Vec<(String, String, u64)> {
    v.into_iter()
        .map(|m| (m.instance.to_string(), m.location.to_string(), m.length))
        .collect()
}

fn run(ops: &[TestOp], probes: &[Vec<u32>], space: KeySpace) -> Result<(), TestCaseError> {
    let ix = SharedIndex::new(CHUNK, space).unwrap();
    let mut model = Model::new(space);
    let snap = std::env::temp_dir().join(format!(
        "lmcache_rs_model_{}_{}.bin",
        space.name(),
        std::process::id()
    ));
    let keys = |t: &[u32]| space.keys(t, CHUNK);
    for op in ops {
        match op {
            TestOp::Admit(i, w, l, t) => {
                let k = keys(t);
                let got = ix.write(Op::Admit(
                    event(EventKind::Admit, *i, *w, *l),
                    k.clone().into(),
                ));
                prop_assert_eq!(got.0, model.admit(INSTANCES[*i], *w, LOCATIONS[*l], &k));
            }
            TestOp::AdmitKeys(i, w, l, t, p) => {
                let k = picked(&keys(t), p);
                let got = ix.write(Op::Admit(
                    event(EventKind::Admit, *i, *w, *l),
                    k.clone().into(),
                ));
                prop_assert_eq!(got.0, model.admit(INSTANCES[*i], *w, LOCATIONS[*l], &k));
            }
            TestOp::Evict(i, w, l, t) => {
                let k = keys(t);
                let got = ix.write(Op::Evict(
                    event(EventKind::Evict, *i, *w, *l),
                    k.clone().into(),
                ));
                prop_assert_eq!(got.1, model.evict(INSTANCES[*i], *w, LOCATIONS[*l], &k));
            }
            TestOp::EvictKeys(i, w, l, t, p) => {
                let k = picked(&keys(t), p);
                let got = ix.write(Op::Evict(
                    event(EventKind::Evict, *i, *w, *l),
                    k.clone().into(),
                ));
                prop_assert_eq!(got.1, model.evict(INSTANCES[*i], *w, LOCATIONS[*l], &k));
            }
            TestOp::Batch(evs) => {
                let mut b = Batch::default();
                let mut want = (0, 0);
                for (what, i, w, l, t) in evs {
                    let k = keys(t);
                    let kind = match what {
                        0 => EventKind::Admit,
                        1 => EventKind::Evict,
                        2 => EventKind::Drop,
                        _ => EventKind::DropAll,
                    };
                    let mut ev = (*event(kind, *i, *w, *l)).clone();
                    ev.start = b.keys.len();
                    b.keys.extend_from_slice(&k);
                    ev.end = b.keys.len();
                    b.events.push(ev);
                    let (inst, loc) = (INSTANCES[*i], LOCATIONS[*l]);
                    match kind {
                        EventKind::Admit => want.0 += model.admit(inst, *w, loc, &k),
                        EventKind::Evict => want.1 += model.evict(inst, *w, loc, &k),
                        EventKind::Drop => {
                            want.1 += model.drop_where(|h| h.0 == inst && h.1 == *w && h.2 == loc)
                        }
                        EventKind::DropAll => {
                            want.1 += model.drop_where(|h| h.0 == inst && h.1 == *w)
                        }
                    }
                }
                prop_assert_eq!(ix.write(Op::Batch(Arc::new(b))), want);
            }
            TestOp::Register(i, w) => {
                ix.write(Op::RegisterWorker(INSTANCES[*i].into(), *w));
                model.register(INSTANCES[*i], *w);
            }
            TestOp::Remove(i, w) => {
                let got = ix.write(Op::RemoveWorker(INSTANCES[*i].into(), *w));
                prop_assert_eq!(got.1, model.remove_worker(INSTANCES[*i], *w));
            }
            TestOp::Clear(i, l) => {
                let loc = l.map(|l| Arc::<str>::from(LOCATIONS[l]));
                let got = ix.write(Op::Clear(INSTANCES[*i].into(), loc));
                prop_assert_eq!(got.1, model.clear(INSTANCES[*i], l.map(|l| LOCATIONS[l])));
            }
            TestOp::DumpLoad => {
                ix.dump(&snap, 0).unwrap();
                ix.load(&snap).unwrap();
            }
        }
        if let Err(e) = ix.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        for p in probes {
            prop_assert_eq!(
                as_tuples(ix.read(|c| c.lookup(p))),
                model.lookup(p),
                "probe {:?}",
                p
            );
        }
        let holdings: u64 = model.holdings.values().map(|h| h.len() as u64).sum();
        ix.read(|c| {
            prop_assert_eq!(c.reg.holdings, holdings);
            prop_assert_eq!(c.table.len(), model.holdings.len());
            let workers: Vec<(String, Vec<u32>)> = c
                .workers()
                .into_iter()
                .map(|(i, w)| (i.to_string(), w))
                .collect();
            let want: Vec<(String, Vec<u32>)> = model
                .workers
                .iter()
                .map(|(i, w)| (i.clone(), w.iter().copied().collect()))
                .collect();
            prop_assert_eq!(workers, want);
            Ok(())
        })?;
    }
    let _ = std::fs::remove_file(&snap);
    Ok(())
}

fn probes() -> Vec<Vec<u32>> {
    let mut v = Vec::new();
    for b in 0..3u32 {
        let base: Vec<u32> = (0..15u32).map(|i| (i * (b + 1)) % 7).collect();
        for n in [0, 2, 3, 5, 6, 9, 15] {
            v.push(base[..n].to_vec());
        }
    }
    v
}

proptest! {
    // 5 cases x 2,000 ops = 10,000 random operations per run
    #![proptest_config(ProptestConfig { cases: 5, max_shrink_iters: 2_000, ..ProptestConfig::default() })]
    #[test]
    fn index_matches_naive_model(ops in proptest::collection::vec(op(), 2_000)) {
        run(&ops, &probes(), XXH3)?;
    }
}

proptest! {
    // the same model over LMCache's key chain (the index logic is shared; this checks the walk)
    #![proptest_config(ProptestConfig { cases: 2, max_shrink_iters: 2_000, ..ProptestConfig::default() })]
    #[test]
    fn lmcache_keys_match_naive_model(ops in proptest::collection::vec(op(), 2_000)) {
        run(&ops, &probes(), LMCACHE)?;
    }
}

#[test]
fn deep_chain_million_chunks() {
    let n = 1_000_000u32;
    let tokens: Vec<u32> = (0..n).collect();
    let ix = SharedIndex::new(1, KeySpace::Xxh3 { seed: 0 }).unwrap();
    let keys: Arc<[u64]> = chunk_hashes(&tokens, 1, 0).into();
    let ev = event(EventKind::Admit, 0, 0, 1);
    assert_eq!(ix.write(Op::Admit(ev.clone(), keys.clone())).0, n as u64);
    let m = ix.read(|c| c.lookup(&tokens));
    assert_eq!(m[0].length, n as u64);
    let path = std::env::temp_dir().join(format!("lmcache_rs_deep_{}.bin", std::process::id()));
    ix.dump(&path, 7).unwrap();
    let ix2 = SharedIndex::new(1, KeySpace::Xxh3 { seed: 0 }).unwrap();
    assert_eq!(ix2.load(&path).unwrap(), 7);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(ix2.read(|c| c.lookup(&tokens))[0].length, n as u64);
    ix2.check_invariants().unwrap();
    assert_eq!(ix2.write(Op::Evict(ev, keys)).1, n as u64);
    assert_eq!(ix2.read(|c| c.table.len()), 0);
    drop(ix);
    drop(ix2);
}
