//! Writes applied behind the caller: a bounded queue and one thread that applies its ops in
//! order, so a caller with more to read and parse (an ingest loop) goes on while the index
//! writes on another core. `settle` waits until everything queued is applied; the index
//! settles before every write of its own, so writes keep one order whichever way they came.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

/// Admitted and evicted holdings of one write.
pub type Counts = (u64, u64);

#[derive(Default)]
struct Progress {
    queued: u64,
    applied: u64,
    /// Counts of the writes applied since the last `settle`.
    counts: Counts,
    /// What the writes that panicked since the last `settle` said (a bug, never input).
    failures: Vec<String>,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // nothing panics while holding this lock; keep going rather than poison every call
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct WriteBehind<Op: Send + 'static> {
    queue: Mutex<Option<SyncSender<Op>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl<Op: Send + 'static> WriteBehind<Op> {
    /// Start the thread; at most `depth` ops wait in the queue (a `submit` beyond that waits).
    /// The thread hands `apply` every op waiting when it comes for the next, in queue order
    /// (at most `depth`), so a writer that fell behind catches up with fewer, larger writes.
    /// A call of `apply` that panics loses its ops, as the same write made directly would
    /// raise; the thread goes on with the next, and `settle` reports it.
    pub fn start(depth: usize, mut apply: impl FnMut(Vec<Op>) -> Counts + Send + 'static) -> Self {
        let (tx, rx) = sync_channel::<Op>(depth.max(1));
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let progress = shared.clone();
        let thread = std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || {
                let depth = depth.max(1);
                while let Ok(first) = rx.recv() {
                    let mut ops = vec![first];
                    while ops.len() < depth {
                        match rx.try_recv() {
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                    let n = ops.len() as u64;
                    let done = catch_unwind(AssertUnwindSafe(|| apply(ops)));
                    let mut p = progress.lock();
                    p.applied += n;
                    match done {
                        Ok((a, e)) => {
                            p.counts.0 += a;
                            p.counts.1 += e;
                        }
                        Err(payload) => p.failures.push(panic_text(&*payload)),
                    }
                    if p.applied == p.queued {
                        progress.changed.notify_all();
                    }
                }
            })
            .expect("spawning the index's writer thread");
        WriteBehind {
            queue: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queue `op`; waits while the queue is full.
    pub fn submit(&self, op: Op) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let tx = queue.as_ref().expect("the queue closes only when dropped");
        self.shared.lock().queued += 1;
        // The queue lock is held across the send, so ops enter in `queued` order. The thread
        // never ends while the queue is open (it catches panics), so the send cannot fail.
        tx.send(op).expect("the index's writer thread ended");
    }

    /// Wait until every queued op is applied; returns their counts since the last settle.
    /// Raises, keeping those counts for the next settle, if a write panicked since the last.
    pub fn settle(&self) -> Result<Counts> {
        let mut p = self.applied_all();
        if !p.failures.is_empty() {
            let failures = std::mem::take(&mut p.failures);
            return Err(Error::invariant(format!(
                "{} write(s) applied behind the caller failed and were lost: {}",
                failures.len(),
                failures.join("; ")
            )));
        }
        Ok(std::mem::take(&mut p.counts))
    }

    /// Wait until every queued op is applied, keeping their counts for the next `settle`.
    pub fn wait(&self) {
        drop(self.applied_all());
    }

    /// The progress once every queued op is applied.
    fn applied_all(&self) -> MutexGuard<'_, Progress> {
        let mut p = self.shared.lock();
        while p.applied < p.queued {
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
        p
    }

    /// Ops queued and not yet applied.
    #[cfg(test)]
    fn pending(&self) -> u64 {
        let p = self.shared.lock();
        p.queued - p.applied
    }
}

impl<Op: Send + 'static> Drop for WriteBehind<Op> {
    fn drop(&mut self) {
        // closing the queue ends the thread after it applied what was queued
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn applies_in_order_and_settles() {
        let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
        let log = seen.clone();
        let wb = WriteBehind::start(4, move |ns: Vec<u64>| {
            assert!(!ns.is_empty() && ns.len() <= 4);
            let mut seen = log.lock().unwrap();
            seen.extend(&ns);
            (ns.iter().sum(), ns.len() as u64)
        });
        for n in 0..1000 {
            wb.submit(n);
        }
        let (a, e) = wb.settle().unwrap();
        assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
        assert_eq!((a, e), ((0..1000).sum(), 1000));
        assert_eq!(wb.pending(), 0);
        assert_eq!(wb.settle().unwrap(), (0, 0), "counts are taken once");
    }

    #[test]
    fn settle_waits_for_a_slow_write() {
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let wb = WriteBehind::start(1, move |_: Vec<()>| {
            while !r.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            (1, 0)
        });
        wb.submit(());
        assert_eq!(wb.pending(), 1);
        let releaser = {
            let release = release.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                release.store(true, Ordering::Release);
            })
        };
        assert_eq!(wb.settle().unwrap(), (1, 0));
        assert!(
            release.load(Ordering::Acquire),
            "settled before the write finished"
        );
        releaser.join().unwrap();
    }

    #[test]
    fn a_panicking_write_is_reported_and_the_next_ones_still_apply() {
        let wb = WriteBehind::start(1, |ns: Vec<u64>| {
            assert!(!ns.contains(&3), "write 3 fails");
            (ns.len() as u64, 0)
        });
        for n in 0..3 {
            wb.submit(n);
        }
        assert_eq!(wb.settle().unwrap(), (3, 0));
        wb.submit(3);
        wb.submit(4);
        let err = wb.settle().unwrap_err().to_string();
        assert!(err.contains("write 3 fails"), "{err}");
        wb.submit(5);
        // the count of write 4 was kept through the failed settle
        assert_eq!(wb.settle().unwrap(), (2, 0));
    }

    #[test]
    fn drop_applies_what_was_queued() {
        let seen = Arc::new(Mutex::new(0u64));
        let log = seen.clone();
        {
            let wb = WriteBehind::start(8, move |ns: Vec<u64>| {
                *log.lock().unwrap() += ns.iter().sum::<u64>();
                (0, 0)
            });
            for n in 1..=100 {
                wb.submit(n);
            }
        }
        assert_eq!(*seen.lock().unwrap(), 5050);
    }
}
