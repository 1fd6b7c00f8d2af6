//! The concurrent index: two copies of `Core` kept in step by left-right.
//!
//! Readers never wait for writers: each reading thread has its own `ReadHandle` (created lazily
//! from a factory) and reads whichever copy is published. Writers serialize on a mutex around
//! the `WriteHandle`, append one op per call and publish once, so every call is atomic for
//! readers. Nothing here starts a thread, except `start_write_behind`, on request: from then on
//! `write_later` queues batches for one thread that applies them in order (`write_behind.rs`),
//! and every other write, snapshot and invariant check first waits for that queue.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use left_right::{ReadHandle, ReadHandleFactory, WriteHandle};
use thread_local::ThreadLocal;

use crate::error::{Error, Result};
use crate::index::{Batch, Core, Op, OpResult};
use crate::json;
use crate::keyspace::KeySpace;
use crate::snapshot;
use crate::write_behind::{Counts, WriteBehind};

/// Batches the write-behind queue holds before `write_later` waits: enough to keep its thread busy
/// while the caller parses the next batch, few enough to bound the memory they hold.
pub const WRITE_BEHIND_DEPTH: usize = 16;

type Writer = Arc<Mutex<WriteHandle<Core, Op>>>;

fn lock(writer: &Writer) -> MutexGuard<'_, WriteHandle<Core, Op>> {
    // absorbing never panics on input; if it ever did, the copies are still consistent
    // up to the last publish, so keep going rather than poisoning every later call
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// Apply one op and publish it; returns its counts.
fn publish(writer: &Writer, op: Op) -> OpResult {
    let mut w = lock(writer);
    w.append(op);
    w.publish();
    w.enter().map(|c| c.last).unwrap_or((0, 0))
}

/// Apply the batches queued behind, in order, as one joined batch: one publish (one left-right
/// swap and one wait for readers) however many callers queued them.
fn publish_batches(writer: &Writer, mut batches: Vec<Arc<Batch>>) -> OpResult {
    let batch = match batches.len() {
        1 => batches.pop().expect("one batch"),
        _ => Arc::new(Batch::join(&batches)),
    };
    publish(writer, Op::Batch(batch))
}

/// A `/lookup` response body and what the lookup matched.
#[derive(Debug)]
pub struct LookupAnswer {
    pub body: String,
    /// Tokens in the request.
    pub asked: u64,
    /// Tokens of the longest prefix any instance holds (0: no match).
    pub matched: u64,
}

pub struct SharedIndex {
    chunk_size: usize,
    key_space: KeySpace,
    writer: Writer,
    behind: OnceLock<WriteBehind<Arc<Batch>>>,
    factory: ReadHandleFactory<Core>,
    readers: ThreadLocal<ReadHandle<Core>>,
}

impl SharedIndex {
    pub fn new(chunk_size: usize, key_space: KeySpace) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::arg("chunk_size must be > 0"));
        }
        let (mut w, r) = left_right::new_from_empty::<Core, Op>(Core::new(chunk_size, key_space));
        // the first publish only swaps; do it now so every later call is a steady-state one
        w.publish();
        Ok(SharedIndex {
            chunk_size,
            key_space,
            writer: Arc::new(Mutex::new(w)),
            behind: OnceLock::new(),
            factory: r.factory(),
            readers: ThreadLocal::new(),
        })
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    pub fn key_space(&self) -> KeySpace {
        self.key_space
    }

    /// Run `f` on the published copy. Never blocks on writers.
    pub fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        let handle = self.readers.get_or(|| self.factory.handle());
        let guard = handle
            .enter()
            .expect("the write handle lives as long as the index");
        f(&guard)
    }

    /// The /lookup answer for a request body: parse it, look it up (with every location and
    /// worker when `detail`), render the response body. Errors name what is wrong with the body.
    pub fn lookup_json(&self, body: &[u8], event_id: &str, detail: bool) -> Result<String> {
        self.lookup_json_counted(body, event_id, detail)
            .map(|a| a.body)
    }

    /// `lookup_json` with what the lookup matched, for the hit-ratio metrics: counted here,
    /// where the matches are at hand, so the caller pays nothing to learn them.
    pub fn lookup_json_counted(
        &self,
        body: &[u8],
        event_id: &str,
        detail: bool,
    ) -> Result<LookupAnswer> {
        let tokens = json::parse_lookup_tokens(body)?;
        let asked = tokens.len() as u64;
        Ok(self.read(|c| {
            let (matches, det) = if detail {
                let tokens = tokens.into_vec();
                (c.lookup(&tokens), Some(c.lookup_detailed(&tokens)))
            } else {
                // a walk that stops early leaves the rest of the list unread
                (c.lookup_from(tokens), None)
            };
            LookupAnswer {
                body: json::render_lookup(event_id, &matches, det.as_deref()),
                asked,
                matched: matches.iter().map(|m| m.length).max().unwrap_or(0),
            }
        }))
    }

    /// The writer, once every write queued behind is applied.
    fn lock(&self) -> MutexGuard<'_, WriteHandle<Core, Op>> {
        if let Some(b) = self.behind.get() {
            b.wait();
        }
        lock(&self.writer)
    }

    /// Apply one op (after every write queued behind) and publish it; returns its counts.
    pub fn write(&self, op: Op) -> OpResult {
        if let Some(b) = self.behind.get() {
            b.wait();
        }
        publish(&self.writer, op)
    }

    /// Start the thread that applies `write_later`'s batches (once; later calls do nothing).
    pub fn start_write_behind(&self) {
        self.behind.get_or_init(|| {
            let writer = self.writer.clone();
            WriteBehind::start(WRITE_BEHIND_DEPTH, move |batches| {
                publish_batches(&writer, batches)
            })
        });
    }

    pub fn writes_behind(&self) -> bool {
        self.behind.get().is_some()
    }

    /// Queue `op` for the write-behind thread (waits while its queue is full). Readers see it
    /// once that thread applied it; `settle` waits for that.
    pub fn write_later(&self, batch: Arc<Batch>) -> Result<()> {
        match self.behind.get() {
            Some(b) => {
                b.submit(batch);
                Ok(())
            }
            None => Err(Error::arg(
                "this index writes nothing behind: call start_write_behind() first",
            )),
        }
    }

    /// Wait until every op queued behind is applied; their admitted and evicted holdings since
    /// the last settle. (0, 0) when nothing writes behind.
    pub fn settle(&self) -> Result<Counts> {
        self.behind.get().map_or(Ok((0, 0)), |b| b.settle())
    }

    /// Check every invariant of the published copy, then that both copies are identical.
    pub fn check_invariants(&self) -> Result<()> {
        let mut w = self.lock();
        // bring the other copy up to date, then compare both
        w.publish();
        let a = w.enter().map(|c| c.check().map(|_| c.digest()));
        let a = a.ok_or_else(|| Error::invariant("no published copy"))??;
        w.publish();
        let b = w.enter().map(|c| c.check().map(|_| c.digest()));
        let b = b.ok_or_else(|| Error::invariant("no published copy"))??;
        if a != b {
            return Err(Error::invariant(format!(
                "the two left-right copies differ (digests {a:#x} and {b:#x})"
            )));
        }
        Ok(())
    }

    /// Write a snapshot atomically (after the writes queued behind). Readers continue; writers
    /// wait until it is written.
    pub fn dump(&self, path: &Path, log_seq: u64) -> Result<()> {
        if let Some(b) = self.behind.get() {
            b.wait(); // the snapshot holds every write queued before it
        }
        self.read(|core| snapshot::dump(core, path, log_seq))
    }

    /// Replace the contents with a snapshot; validated completely before anything changes.
    /// Returns the log position the snapshot reflects (0 when it names none).
    pub fn load(&self, path: &Path) -> Result<u64> {
        let (core, log_seq) = snapshot::load(path, self.chunk_size, self.key_space)?;
        let mut w = self.lock();
        w.append(Op::Replace(Arc::new(core)));
        w.publish();
        // publish again so the second copy takes the snapshot and the op log lets go of it
        w.publish();
        Ok(log_seq)
    }
}
