//! Snapshot files: a versioned, checksummed binary dump of one index.
//!
//! Layout (all integers little-endian):
//! ```text
//! magic      8 bytes  b"LMCRSIDX"
//! version    u32      FORMAT_VERSION
//! chunk_size u64
//! key space  u32 0 (xxh3) or 1 (lmcache_builtin), then u64: the xxh3 seed, or none_hash as
//!            the two's-complement bit pattern of the i64
//! log_seq    u64      the position in a replicated operation log this state reflects (0: none)
//! instances  u64 n, then n x (name: u32 len + UTF-8, workers: u32 count + u32 ids ascending)
//! locations  u64 n, then n x (name: u32 len + UTF-8)
//! holders    u64 n, then n x (instance u32, worker u32, location u32)   (indices above)
//! sets       u64 n, then n x (u32 count + u32 holder indices ascending)
//! entries    u64 n, then n x (key u64, set u32)
//! checksum   u64      xxh3-64 (seed 0) of every byte before it
//! ```
//! Version 1 files (before key spaces) have `seed u64` in place of the key space and load as
//! xxh3 with that seed; version 1 and 2 files (before log positions) have no `log_seq` and
//! load with 0.
//! Writing streams through a buffer into a temporary file in the target directory, fsyncs and
//! renames it over the target. Reading streams too, builds a fresh `Core` and checks every
//! field (and the checksum) before the caller swaps it in; on any error nothing changes.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::holders::{HolderIx, SetIx, RESERVED_INSTANCE_IDS};
use crate::index::Core;
use crate::keyspace::KeySpace;

pub const MAGIC: &[u8; 8] = b"LMCRSIDX";
pub const FORMAT_VERSION: u32 = 3;
/// The last version without a key space (xxh3 only).
const VERSION_XXH3_ONLY: u32 = 1;
/// The last version without a log position.
const VERSION_NO_LOG_SEQ: u32 = 2;

const SPACE_XXH3: u32 = 0;
const SPACE_LMCACHE_BUILTIN: u32 = 1;

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hasher.update(b);
        self.inner.write_all(b)
    }
    fn u32(&mut self, x: u32) -> std::io::Result<()> {
        self.put(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> std::io::Result<()> {
        self.put(&x.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> std::io::Result<()> {
        self.u32(s.len() as u32)?;
        self.put(s.as_bytes())
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(".{name}.tmp.{}.{nanos}", std::process::id()))
}

/// Write `core` (the state after log message `log_seq`) to `path` atomically.
pub fn dump(core: &Core, path: &Path, log_seq: u64) -> Result<()> {
    let tmp = temp_path(path);
    // errors name the path the caller gave (the temporary file beside it is ours, not theirs)
    let result = write_file(core, &tmp, log_seq).and_then(|_| {
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // make the rename durable; not every platform lets a directory be fsynced
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| e.at(path))
}

fn write_file(core: &Core, tmp: &Path, log_seq: u64) -> Result<()> {
    let file = File::create(tmp)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Xxh3::new(),
    };
    let reg = &core.reg;
    w.put(MAGIC)?;
    w.u32(FORMAT_VERSION)?;
    w.u64(core.chunk_size as u64)?;
    match core.key_space {
        KeySpace::Xxh3 { seed } => {
            w.u32(SPACE_XXH3)?;
            w.u64(seed)?;
        }
        KeySpace::LmcacheBuiltin { none_hash } => {
            w.u32(SPACE_LMCACHE_BUILTIN)?;
            w.u64(none_hash as u64)?;
        }
    }
    w.u64(log_seq)?;
    // dense renumbering of what is live
    let mut inst_ix = vec![u32::MAX; reg.instances.len()];
    let insts: Vec<_> = reg
        .instances
        .iter()
        .enumerate()
        .filter_map(|(i, x)| x.as_ref().filter(|x| !x.workers.is_empty()).map(|x| (i, x)))
        .collect();
    w.u64(insts.len() as u64)?;
    for (n, (i, inst)) in insts.iter().enumerate() {
        inst_ix[*i] = n as u32;
        w.str(&inst.name)?;
        w.u32(inst.workers.len() as u32)?;
        for wk in &inst.workers {
            w.u32(*wk)?;
        }
    }
    let holders: Vec<_> = reg
        .holders
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().filter(|h| h.count > 0).map(|h| (i, h)))
        .collect();
    let mut loc_ix = vec![u32::MAX; reg.locations.len()];
    let mut locs = Vec::new();
    for (_, h) in &holders {
        if loc_ix[h.loc.ix()] == u32::MAX {
            loc_ix[h.loc.ix()] = locs.len() as u32;
            locs.push(h.loc);
        }
    }
    w.u64(locs.len() as u64)?;
    for l in &locs {
        w.str(&reg.location(*l).name)?;
    }
    let mut holder_ix = vec![u32::MAX; reg.holders.len()];
    w.u64(holders.len() as u64)?;
    for (n, (i, h)) in holders.iter().enumerate() {
        holder_ix[*i] = n as u32;
        w.u32(inst_ix[h.inst.ix()])?;
        w.u32(h.worker)?;
        w.u32(loc_ix[h.loc.ix()])?;
    }
    let mut set_ix = vec![u32::MAX; reg.sets.len()];
    let live_sets: Vec<usize> = (1..reg.sets.len())
        .filter(|s| reg.sets[*s].refs > 0)
        .collect();
    w.u64(live_sets.len() as u64)?;
    for (n, s) in live_sets.iter().enumerate() {
        set_ix[*s] = n as u32;
        let mut hs: Vec<u32> = reg.sets[*s]
            .holders
            .iter()
            .map(|h| holder_ix[h.ix()])
            .collect();
        hs.sort_unstable();
        w.u32(hs.len() as u32)?;
        for h in hs {
            w.u32(h)?;
        }
    }
    w.u64(core.table.len() as u64)?;
    for (k, s) in core.table.iter() {
        w.u64(k)?;
        w.u32(set_ix[s as usize])?;
    }
    let sum = w.hasher.digest();
    w.inner.write_all(&sum.to_le_bytes())?;
    let file = w.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

struct Reader<R: Read> {
    inner: R,
    hasher: Xxh3,
    /// Bytes left in the file, to bound every count before allocating.
    left: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::snapshot("snapshot is truncated")
            } else {
                Error::from(e)
            }
        })?;
        self.hasher.update(buf);
        self.left = self.left.saturating_sub(buf.len() as u64);
        Ok(())
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// A u64 count of records of at least `min_size` bytes each, checked against the file size.
    fn count(&mut self, what: &str, min_size: u64) -> Result<usize> {
        let n = self.u64()?;
        self.fits(n, what, min_size)
    }
    /// A u32 count, checked likewise.
    fn count32(&mut self, what: &str, min_size: u64) -> Result<usize> {
        let n = self.u32()? as u64;
        self.fits(n, what, min_size)
    }
    fn fits(&self, n: u64, what: &str, min_size: u64) -> Result<usize> {
        if n.saturating_mul(min_size) > self.left {
            return Err(Error::snapshot(format!(
                "snapshot is corrupt: {n} {what} cannot fit in the file"
            )));
        }
        Ok(n as usize)
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = self.u32()? as u64;
        if n > self.left {
            return Err(Error::snapshot("snapshot is truncated"));
        }
        let mut b = vec![0; n as usize];
        self.bytes(&mut b)?;
        String::from_utf8(b)
            .map_err(|_| Error::snapshot(format!("snapshot is corrupt: {what} is not UTF-8")))
    }
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::snapshot(format!("snapshot is corrupt: {msg}"))
}

/// Read and fully validate a snapshot for an index with this chunk_size and key space: the
/// index and the log position it reflects.
pub fn load(path: &Path, chunk_size: usize, key_space: KeySpace) -> Result<(Core, u64)> {
    read_file(path, chunk_size, key_space).map_err(|e| e.at(path))
}

fn read_file(path: &Path, chunk_size: usize, key_space: KeySpace) -> Result<(Core, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < 8 + 4 + 8 + 8 + 5 * 8 + 8 {
        return Err(Error::snapshot(format!(
            "{} is not an lmcache_rs index snapshot (too short)",
            path.display()
        )));
    }
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: Xxh3::new(),
        left: len - 8,
    };
    let mut magic = [0u8; 8];
    r.bytes(&mut magic)?;
    if &magic != MAGIC {
        return Err(Error::snapshot(format!(
            "{} is not an lmcache_rs index snapshot (bad magic)",
            path.display()
        )));
    }
    let version = r.u32()?;
    if !(VERSION_XXH3_ONLY..=FORMAT_VERSION).contains(&version) {
        return Err(Error::snapshot(format!(
            "snapshot format version {version} is not supported \
             (this build reads {VERSION_XXH3_ONLY} to {FORMAT_VERSION})"
        )));
    }
    let cs = r.u64()?;
    let space = if version == VERSION_XXH3_ONLY {
        SPACE_XXH3
    } else {
        r.u32()?
    };
    let param = r.u64()?;
    let theirs = match space {
        SPACE_XXH3 => KeySpace::Xxh3 { seed: param },
        SPACE_LMCACHE_BUILTIN => KeySpace::LmcacheBuiltin {
            none_hash: param as i64,
        },
        other => return Err(corrupt(format!("unknown key space {other}"))),
    };
    if cs != chunk_size as u64 || theirs != key_space {
        return Err(Error::snapshot(format!(
            "snapshot is for chunk_size={cs}, {theirs}; \
             this index has chunk_size={chunk_size}, {key_space}"
        )));
    }
    let log_seq = if version > VERSION_NO_LOG_SEQ {
        r.u64()?
    } else {
        0
    };
    let mut core = Core::new(chunk_size, key_space);
    let reg = &mut core.reg;

    let n_inst = r.count("instances", 8)?;
    let mut inst_names: Vec<String> = Vec::with_capacity(n_inst);
    let mut inst_workers: Vec<Vec<u32>> = Vec::with_capacity(n_inst);
    for _ in 0..n_inst {
        let name = r.str("an instance id")?;
        if RESERVED_INSTANCE_IDS.contains(&name.as_str()) {
            return Err(corrupt(format!("reserved instance id {name:?}")));
        }
        if reg.find_instance(&name).is_some() {
            return Err(corrupt(format!("instance {name:?} listed twice")));
        }
        let nw = r.count32("workers", 4)?;
        if nw == 0 {
            return Err(corrupt(format!("instance {name:?} has no worker")));
        }
        let mut ws = Vec::with_capacity(nw);
        for _ in 0..nw {
            let w = r.u32()?;
            if ws.last().is_some_and(|p| *p >= w) {
                return Err(corrupt(format!("workers of {name:?} not ascending")));
            }
            ws.push(w);
            reg.register_worker(&name, w);
        }
        inst_names.push(name);
        inst_workers.push(ws);
    }
    let n_loc = r.count("locations", 4)?;
    let mut loc_names: Vec<String> = Vec::with_capacity(n_loc);
    let mut loc_seen = std::collections::HashSet::new();
    for _ in 0..n_loc {
        let name = r.str("a location")?;
        if !loc_seen.insert(name.clone()) {
            return Err(corrupt(format!("location {name:?} listed twice")));
        }
        loc_names.push(name);
    }
    let n_holders = r.count("holders", 12)?;
    let mut holders: Vec<HolderIx> = Vec::with_capacity(n_holders);
    for n in 0..n_holders {
        let (i, w, l) = (r.u32()? as usize, r.u32()?, r.u32()? as usize);
        if i >= inst_names.len() || l >= loc_names.len() {
            return Err(corrupt(format!(
                "holder {n} refers to a missing instance or location"
            )));
        }
        if inst_workers[i].binary_search(&w).is_err() {
            return Err(corrupt(format!(
                "holder {n} refers to a worker that is not registered"
            )));
        }
        if reg.find_holder(&inst_names[i], w, &loc_names[l]).is_some() {
            return Err(corrupt(format!("holder {n} listed twice")));
        }
        holders.push(reg.intern_holder(&inst_names[i], w, &loc_names[l]));
    }
    let n_sets = r.count("holder sets", 8)?;
    let mut sets: Vec<SetIx> = Vec::with_capacity(n_sets);
    let mut seen: Vec<bool> = Vec::new();
    for n in 0..n_sets {
        let k = r.count32("set members", 4)?;
        if k == 0 {
            return Err(corrupt(format!("holder set {n} is empty")));
        }
        let mut hs = Vec::with_capacity(k);
        let mut prev: Option<u32> = None;
        for _ in 0..k {
            let h = r.u32()?;
            if prev.is_some_and(|p| p >= h) || h as usize >= holders.len() {
                return Err(corrupt(format!("holder set {n} has bad members")));
            }
            prev = Some(h);
            hs.push(holders[h as usize]);
        }
        hs.sort_unstable();
        let s = reg.intern_set(hs);
        if seen.len() <= s.ix() {
            seen.resize(s.ix() + 1, false);
        }
        if std::mem::replace(&mut seen[s.ix()], true) {
            return Err(corrupt(format!("holder set {n} listed twice")));
        }
        sets.push(s);
    }
    let n_entries = r.count("entries", 12)?;
    let mut table = crate::table::Table::with_capacity_for(n_entries);
    let mut refs = vec![0u64; n_sets];
    for _ in 0..n_entries {
        let key = r.u64()?;
        let s = r.u32()? as usize;
        if s >= sets.len() {
            return Err(corrupt(format!(
                "entry {key:#x} refers to a missing holder set"
            )));
        }
        if table.insert(key, sets[s].0).is_some() {
            return Err(corrupt(format!("key {key:#x} listed twice")));
        }
        refs[s] += 1;
    }
    let want = r.hasher.digest();
    let mut b = [0u8; 8];
    r.inner
        .read_exact(&mut b)
        .map_err(|_| Error::snapshot("snapshot is truncated"))?;
    if u64::from_le_bytes(b) != want {
        return Err(Error::snapshot(
            "snapshot checksum mismatch (the file is corrupt)",
        ));
    }
    let mut extra = [0u8; 1];
    if r.inner.read(&mut extra)? != 0 {
        return Err(corrupt("trailing bytes after the checksum"));
    }
    for (n, s) in sets.iter().enumerate() {
        reg.incref_by(*s, refs[n]);
        let members = reg.set(*s).holders.clone();
        for h in members.iter() {
            reg.add_count(*h, refs[n]);
        }
    }
    reg.gc();
    core.table = table;
    Ok((core, log_seq))
}
