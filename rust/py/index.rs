//! `lmcache_rs.Index` and `chunk_hashes`: argument conversion, then the core call with the GIL
//! released (through `detached`), then result conversion.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::error::{Error, Result};
use crate::hash::{chunk_hashes_after, PrefixHash};
use crate::http_fast;
use crate::index::{validate_instance_id, Batch, DetailedMatch, Event, EventKind, Match, Op};
use crate::keyspace::KeySpace;
use crate::py::convert::{
    bool_arg, i64_arg, int_arg, no_kwargs, path_arg, str_arg, str_tuple, IntsArg,
};
use crate::shared::{LookupAnswer, SharedIndex};

/// Run `f` with the GIL released; map the core error on the way back.
fn detached<T: Send, F: Send + FnOnce() -> Result<T>>(py: Python<'_>, f: F) -> PyResult<T> {
    py.detach(f).map_err(PyErr::from)
}

fn worker_arg(obj: &Bound<'_, PyAny>) -> Result<u32> {
    Ok(int_arg(obj, "worker_id", u32::MAX as u64)? as u32)
}

pub fn chunk_size_arg(obj: &Bound<'_, PyAny>) -> Result<usize> {
    let v = int_arg(obj, "chunk_size", u32::MAX as u64)?;
    if v == 0 {
        return Err(Error::arg("chunk_size must be > 0"));
    }
    Ok(v as usize)
}

/// Chained seeded xxh3-64 keys of the chunks of `tokens` (see rust/README.md); with `parent`,
/// the keys continue the chain after that key.
#[pyfunction]
#[pyo3(
    signature = (tokens, chunk_size=None, seed=None, *, parent=None, **kwargs),
    text_signature = "(tokens, chunk_size=256, seed=0, *, parent=None)"
)]
pub fn chunk_hashes<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    chunk_size: Option<&Bound<'py, PyAny>>,
    seed: Option<&Bound<'py, PyAny>>,
    parent: Option<&Bound<'py, PyAny>>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyList>> {
    no_kwargs("chunk_hashes", kwargs)?;
    let parent = match parent {
        Some(p) if !p.is_none() => Some(int_arg(p, "parent", u64::MAX)?),
        _ => None,
    };
    let cs = chunk_size.map(chunk_size_arg).transpose()?.unwrap_or(256);
    let seed = seed
        .map(|s| int_arg(s, "seed", u64::MAX))
        .transpose()?
        .unwrap_or(0);
    let tokens = IntsArg::<u32>::extract(tokens, "tokens")?;
    let keys = detached(py, || {
        Ok(chunk_hashes_after(parent, &tokens.view()?, cs, seed))
    })?;
    PyList::new(py, keys)
}

/// Whether a `/lookup` body's top-level object gives one of `names` (a tuple of str) a value
/// other than null, read without its tokens list (rust/json.rs `names_any`). Exact for JSON
/// (a JSON value that is not an object names nothing); unspecified for a body that is not JSON.
#[pyfunction]
#[pyo3(signature = (body, names, **kwargs), text_signature = "(body, names)")]
pub fn lookup_body_names(
    body: &[u8],
    names: &Bound<'_, PyAny>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<bool> {
    no_kwargs("lookup_body_names", kwargs)?;
    let names = str_tuple(names, "names")?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(crate::json::names_any(body, &names))
}

/// What this build does on the running interpreter (for diagnostics and tests).
#[pyfunction]
pub fn runtime_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item("fast_int_lists", crate::py::convert::fast_int_lists(py))?;
    Ok(d)
}

/// What a write call names: one holder and its keys.
enum Keys {
    Tokens(IntsArg<u32>),
    Hashes(IntsArg<u64>),
}

fn keys_arg(tokens: Option<&Bound<'_, PyAny>>, hashes: Option<&Bound<'_, PyAny>>) -> Result<Keys> {
    match (
        tokens.filter(|t| !t.is_none()),
        hashes.filter(|h| !h.is_none()),
    ) {
        (Some(t), None) => Ok(Keys::Tokens(IntsArg::extract(t, "tokens")?)),
        (None, Some(h)) => Ok(Keys::Hashes(IntsArg::extract(h, "hashes")?)),
        (Some(_), Some(_)) => Err(Error::arg("give either tokens= or hashes=, not both")),
        (None, None) => Err(Error::arg("one of tokens= or hashes= is required")),
    }
}

/// The chunked-prefix index of KV-cache holders. Thread-safe: lookups never wait for writers.
///
/// Tokens are cut into chunks of ``chunk_size`` (the final partial chunk is a chunk too), each
/// keyed by a chained hash of the chunks before it: ``"xxh3"`` (``chunk_hashes``, with
/// ``seed``) or ``"lmcache_builtin"`` (LMCache's builtin ``hash()`` chain,
/// ``lmcache_chunk_hashes``, started from ``none_hash``). A holder is (instance_id, worker_id,
/// location); an instance matches a chunk at a location only when every worker it has holds
/// it there.
///
/// >>> ix = Index(chunk_size=4)
/// >>> ix.admit("inst", 0, "LocalCPUBackend", tokens=list(range(10)))
/// 3
/// >>> ix.lookup(list(range(8)) + [99])
/// {'inst': ('LocalCPUBackend', 8)}
///
/// Every method raises InvalidTypeError / InvalidArgumentError (naming the argument) on bad
/// input, including unknown keyword arguments, and then changes nothing. (A missing required
/// argument is refused by Python's call itself: a plain TypeError, of which InvalidTypeError
/// is a subclass.) With ``"lmcache_builtin"``, ``seed`` must be 0; with ``"xxh3"``,
/// ``none_hash`` must be 0. Keys given as ``hashes=`` must be of the index's key space.
///
/// A thread's first call registers it as a reader; that one step may wait for a write being
/// published. Buffers that can be written to (numpy arrays, bytearray, array.array) are copied
/// before the index reads them without the GIL; read-only ones (bytes, a numpy array after
/// ``setflags(write=False)``) are read in place. A buffer another thread writes during the
/// call may still be read half old, half new.
#[pyclass(name = "Index", module = "lmcache_rs._core", frozen)]
pub struct PyIndex {
    inner: SharedIndex,
}

/// What `answer_lookups` returns (see its docstring).
type AnsweredTuple<'py> = (Bound<'py, PyBytes>, usize, Vec<f64>, bool, u64, u64, u64);

impl PyIndex {
    /// Apply a batch built in Rust (an engine map's operations); returns (admitted, evicted).
    pub(crate) fn write_batch(&self, py: Python<'_>, batch: Arc<Batch>) -> PyResult<(u64, u64)> {
        detached(py, || Ok(self.inner.write(Op::Batch(batch))))
    }

    /// `apply_batch`'s events, validated as a whole, as one batch.
    fn batch_arg(&self, py: Python<'_>, events: &Bound<'_, PyAny>) -> PyResult<Arc<Batch>> {
        let mut batch = Batch::default();
        let it = events.try_iter().map_err(|_| {
            Error::ty(
                "events must be an iterable of (op, instance_id, worker_id, location, hashes)",
            )
        })?;
        for (n, item) in it.enumerate() {
            let item = item?;
            let tuple = item.cast::<PyTuple>().map_err(|_| {
                Error::ty(format!(
                    "events[{n}] must be a tuple (op, instance_id, worker_id, location, hashes)"
                ))
            })?;
            if tuple.len() != 5 {
                return Err(Error::arg(format!(
                    "events[{n}] has {} items; expected (op, instance_id, worker_id, location, hashes)",
                    tuple.len()
                ))
                .into());
            }
            let op = str_arg(&tuple.get_item(0)?, "op").map_err(|e| prefix_err(n, e))?;
            let location = tuple.get_item(3)?;
            let kind = match &*op {
                "admit" => EventKind::Admit,
                "evict" => EventKind::Evict,
                "drop" if location.is_none() => EventKind::DropAll,
                "drop" => EventKind::Drop,
                other => {
                    return Err(Error::arg(format!(
                    "events[{n}]: unknown op {other:?} (expected \"admit\", \"evict\" or \"drop\")"
                ))
                    .into())
                }
            };
            let location = if kind == EventKind::DropAll {
                pyo3::types::PyString::new(py, "").into_any()
            } else {
                location
            };
            let mut ev = self
                .event(kind, &tuple.get_item(1)?, &tuple.get_item(2)?, &location)
                .map_err(|e| prefix_err(n, e))?;
            let hashes = match kind {
                // a drop names no keys; whatever is in the hashes slot is ignored
                EventKind::Drop | EventKind::DropAll => Vec::new(),
                _ => IntsArg::<u64>::extract(&tuple.get_item(4)?, "hashes")
                    .and_then(|h| h.view().map(|v| v.into_owned()))
                    .map_err(|e| prefix_err(n, e))?,
            };
            // names repeat across events: share the previous event's allocation
            if let Some(prev) = batch.events.last() {
                if prev.instance == ev.instance {
                    ev.instance = prev.instance.clone();
                }
                if prev.location == ev.location {
                    ev.location = prev.location.clone();
                }
            }
            ev.start = batch.keys.len();
            batch.keys.extend_from_slice(&hashes);
            ev.end = batch.keys.len();
            batch.events.push(ev);
        }
        Ok(Arc::new(batch))
    }

    /// Queue a batch for the write-behind thread (waiting, without the GIL, while it is full).
    pub(crate) fn write_batch_later(&self, py: Python<'_>, batch: Arc<Batch>) -> PyResult<()> {
        detached(py, || self.inner.write_later(batch))
    }

    /// The /lookup answer for `body` (bytes, or any byte buffer, copied), with the GIL released.
    fn answer_json(
        &self,
        py: Python<'_>,
        body: &Bound<'_, PyAny>,
        event_id: &Bound<'_, PyAny>,
        detail: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<LookupAnswer> {
        let event_id = str_arg(event_id, "event_id")?;
        let detail = detail
            .map(|d| bool_arg(d, "detail"))
            .transpose()?
            .unwrap_or(false);
        let render = |body: &[u8]| self.inner.lookup_json_counted(body, &event_id, detail);
        if let Ok(b) = body.cast::<PyBytes>() {
            let bytes = b.as_bytes();
            return detached(py, || render(bytes));
        }
        // bytearray, memoryview, ...: copy the bytes (the controller passes bytes)
        let owned = pyo3::buffer::PyBuffer::<u8>::get(body)
            .and_then(|b| b.to_vec(py))
            .map_err(|_| {
                Error::ty(format!(
                    "body must be bytes, not {}",
                    body.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
        detached(py, || render(&owned))
    }

    fn event(
        &self,
        kind: EventKind,
        instance_id: &Bound<'_, PyAny>,
        worker_id: &Bound<'_, PyAny>,
        location: &Bound<'_, PyAny>,
    ) -> Result<Event> {
        let instance = str_arg(instance_id, "instance_id")?;
        if kind == EventKind::Admit {
            validate_instance_id(&instance)?;
        }
        Ok(Event {
            kind,
            instance,
            worker: worker_arg(worker_id)?,
            location: str_arg(location, "location")?,
            start: 0,
            end: 0,
        })
    }

    fn write_keys(&self, py: Python<'_>, ev: Event, keys: Keys) -> PyResult<u64> {
        let (cs, space) = (self.inner.chunk_size(), self.inner.key_space());
        let kind = ev.kind;
        detached(py, move || {
            let keys: Arc<[PrefixHash]> = match &keys {
                Keys::Tokens(t) => space.keys(&t.view()?, cs).into(),
                Keys::Hashes(h) => h.view()?.as_ref().into(),
            };
            let ev = Arc::new(ev);
            let (added, removed) = if kind == EventKind::Admit {
                self.inner.write(Op::Admit(ev, keys))
            } else {
                self.inner.write(Op::Evict(ev, keys))
            };
            Ok(added + removed)
        })
    }
}

fn detail_dict<'py>(py: Python<'py>, d: &DetailedMatch) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    match &d.best {
        Some((loc, n)) => {
            out.set_item("location", &**loc)?;
            out.set_item("matched_prefix_length", *n)?;
        }
        None => {
            out.set_item("location", py.None())?;
            out.set_item("matched_prefix_length", 0)?;
        }
    }
    let locs = PyDict::new(py);
    for (loc, n) in &d.locations {
        locs.set_item(&**loc, *n)?;
    }
    out.set_item("locations", locs)?;
    let workers = PyDict::new(py);
    for (w, per) in &d.workers {
        let m = PyDict::new(py);
        for (loc, n) in per {
            m.set_item(&**loc, *n)?;
        }
        workers.set_item(*w, m)?;
    }
    out.set_item("workers", workers)?;
    Ok(out)
}

#[pymethods]
impl PyIndex {
    #[new]
    #[pyo3(
        signature = (chunk_size=None, seed=None, *, key_space=None, none_hash=None, **kwargs),
        text_signature = "(chunk_size=256, seed=0, *, key_space='xxh3', none_hash=0)"
    )]
    fn new(
        chunk_size: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        key_space: Option<&Bound<'_, PyAny>>,
        none_hash: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        no_kwargs("Index", kwargs)?;
        let cs = chunk_size.map(chunk_size_arg).transpose()?.unwrap_or(256);
        let seed = seed
            .map(|s| int_arg(s, "seed", u64::MAX))
            .transpose()?
            .unwrap_or(0);
        let name = key_space
            .map(|k| str_arg(k, "key_space"))
            .transpose()?
            .unwrap_or_else(|| KeySpace::XXH3.into());
        let none_hash = none_hash
            .map(|n| i64_arg(n, "none_hash"))
            .transpose()?
            .unwrap_or(0);
        let space = KeySpace::from_parts(&name, seed, none_hash)?;
        Ok(PyIndex {
            inner: SharedIndex::new(cs, space)?,
        })
    }

    /// Tokens per chunk.
    #[getter]
    fn chunk_size(&self) -> usize {
        self.inner.chunk_size()
    }

    /// The xxh3 seed of the chunk keys (0 for "lmcache_builtin").
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.key_space().seed()
    }

    /// "xxh3" or "lmcache_builtin".
    #[getter]
    fn key_space(&self) -> &'static str {
        self.inner.key_space().name()
    }

    /// The chain's starting key of "lmcache_builtin" (0 for "xxh3").
    #[getter]
    fn none_hash(&self) -> i64 {
        self.inner.key_space().none_hash()
    }

    /// Register a worker of an instance (it holds nothing yet). While registered, the instance
    /// matches a chunk only where this worker holds it too.
    #[pyo3(signature = (instance_id, worker_id, **kwargs), text_signature = "(self, instance_id, worker_id)")]
    fn register_worker(
        &self,
        py: Python<'_>,
        instance_id: &Bound<'_, PyAny>,
        worker_id: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        no_kwargs("register_worker", kwargs)?;
        let inst = str_arg(instance_id, "instance_id")?;
        validate_instance_id(&inst)?;
        let w = worker_arg(worker_id)?;
        detached(py, || {
            self.inner.write(Op::RegisterWorker(inst, w));
            Ok(())
        })
    }

    /// Unregister the worker and drop all its holdings; returns holdings dropped.
    #[pyo3(signature = (instance_id, worker_id, **kwargs), text_signature = "(self, instance_id, worker_id)")]
    fn remove_worker(
        &self,
        py: Python<'_>,
        instance_id: &Bound<'_, PyAny>,
        worker_id: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        no_kwargs("remove_worker", kwargs)?;
        let inst = str_arg(instance_id, "instance_id")?;
        let w = worker_arg(worker_id)?;
        detached(py, || Ok(self.inner.write(Op::RemoveWorker(inst, w)).1))
    }

    /// Live workers per instance: {instance_id: [worker_id, ...]}.
    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ws = detached(py, || Ok(self.inner.read(|c| c.workers())))?;
        let out = PyDict::new(py);
        for (inst, w) in ws {
            out.set_item(&*inst, w)?;
        }
        Ok(out)
    }

    #[pyo3(
        signature = (instance_id, worker_id, location, tokens=None, hashes=None, **kwargs),
        text_signature = "(self, instance_id, worker_id, location, tokens=None, hashes=None)"
    )]
    /// Record that the worker holds these chunks at location; give exactly one of tokens=
    /// (hashed here) or hashes= (chunk keys already computed). An unknown worker is registered.
    /// Returns the number of new (holder, chunk) holdings.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        py: Python<'_>,
        instance_id: &Bound<'_, PyAny>,
        worker_id: &Bound<'_, PyAny>,
        location: &Bound<'_, PyAny>,
        tokens: Option<&Bound<'_, PyAny>>,
        hashes: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        no_kwargs("admit", kwargs)?;
        let ev = self.event(EventKind::Admit, instance_id, worker_id, location)?;
        let keys = keys_arg(tokens, hashes)?;
        self.write_keys(py, ev, keys)
    }

    #[pyo3(
        signature = (instance_id, worker_id, location, tokens=None, hashes=None, **kwargs),
        text_signature = "(self, instance_id, worker_id, location, tokens=None, hashes=None)"
    )]
    /// Forget that the worker holds these chunks at location (tokens= or hashes=); returns
    /// holdings removed.
    #[allow(clippy::too_many_arguments)]
    fn evict(
        &self,
        py: Python<'_>,
        instance_id: &Bound<'_, PyAny>,
        worker_id: &Bound<'_, PyAny>,
        location: &Bound<'_, PyAny>,
        tokens: Option<&Bound<'_, PyAny>>,
        hashes: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        no_kwargs("evict", kwargs)?;
        let ev = self.event(EventKind::Evict, instance_id, worker_id, location)?;
        let keys = keys_arg(tokens, hashes)?;
        self.write_keys(py, ev, keys)
    }

    /// Apply many ("admit" | "evict", instance_id, worker_id, location, hashes) events, and
    /// ("drop", instance_id, worker_id, location | None, ignored): drop what the worker holds at
    /// that location (None: anywhere), keeping it registered. Validated as a whole first (a bad
    /// event raises and nothing is applied), then applied in order and published at once:
    /// readers see all of it or none. Returns (admitted, evicted), drops counted as evicted.
    #[pyo3(signature = (events, **kwargs), text_signature = "(self, events)")]
    fn apply_batch(
        &self,
        py: Python<'_>,
        events: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(u64, u64)> {
        no_kwargs("apply_batch", kwargs)?;
        let batch = self.batch_arg(py, events)?;
        detached(py, || Ok(self.inner.write(Op::Batch(batch))))
    }

    /// Start a thread that applies ``apply_batch_later``'s batches in order, behind the caller
    /// (once; a second call does nothing). From then on every other write, ``dump`` and
    /// ``check_invariants`` first wait until the batches queued are applied.
    fn start_write_behind(&self) {
        self.inner.start_write_behind();
    }

    /// ``apply_batch``, validated now and applied by the write-behind thread after the batches
    /// queued before it: readers see it a little later, all of it or none. Waits while that
    /// thread is a few batches behind. ``settle()`` waits for it and returns its counts.
    #[pyo3(signature = (events, **kwargs), text_signature = "(self, events)")]
    fn apply_batch_later(
        &self,
        py: Python<'_>,
        events: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        no_kwargs("apply_batch_later", kwargs)?;
        let batch = self.batch_arg(py, events)?;
        self.write_batch_later(py, batch)
    }

    /// Wait until every batch queued by ``apply_batch_later`` (or ``EngineOps.apply_later``) is
    /// applied; returns their (admitted, evicted) since the last ``settle`` ((0, 0) when
    /// nothing writes behind). Raises LMCacheError if a queued write failed (a bug; it is
    /// lost, as it would have raised written directly), keeping the counts for the next settle.
    fn settle(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        detached(py, || self.inner.settle())
    }

    /// Whether ``start_write_behind`` was called.
    #[getter]
    fn writes_behind(&self) -> bool {
        self.inner.writes_behind()
    }
    /// Drop the instance's holdings (at one location, or all); returns holdings dropped.
    #[pyo3(signature = (instance_id, location=None, **kwargs), text_signature = "(self, instance_id, location=None)")]
    fn clear(
        &self,
        py: Python<'_>,
        instance_id: &Bound<'_, PyAny>,
        location: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        no_kwargs("clear", kwargs)?;
        let inst = str_arg(instance_id, "instance_id")?;
        let loc = match location.filter(|l| !l.is_none()) {
            Some(l) => Some(str_arg(l, "location")?),
            None => None,
        };
        detached(py, || Ok(self.inner.write(Op::Clear(inst, loc)).1))
    }

    /// {instance_id: (location, matched_prefix_length)} for every instance with a match: the
    /// tokens of its longest run of matched chunks from the start, at the location with the
    /// longest match (ties: the faster tier).
    #[pyo3(signature = (tokens, **kwargs), text_signature = "(self, tokens)")]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        no_kwargs("lookup", kwargs)?;
        let tokens = IntsArg::<u32>::extract(tokens, "tokens")?;
        let matches = detached(py, || {
            let t = tokens.view()?;
            Ok(self.inner.read(|c| c.lookup(&t)))
        })?;
        matches_dict(py, matches)
    }

    /// Like ``lookup``, for chunk keys already computed (e.g. a peer's): {instance_id:
    /// (location, matched chunks)}.
    #[pyo3(signature = (hashes, **kwargs), text_signature = "(self, hashes)")]
    fn lookup_keys<'py>(
        &self,
        py: Python<'py>,
        hashes: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        no_kwargs("lookup_keys", kwargs)?;
        let hashes = IntsArg::<PrefixHash>::extract(hashes, "hashes")?;
        let matches = detached(py, || {
            let h = hashes.view()?;
            Ok(self.inner.read(|c| c.lookup_keys(&h)))
        })?;
        matches_dict(py, matches)
    }

    /// {instance_id: {"location", "matched_prefix_length", "locations": {location: n},
    /// "workers": {worker_id: {location: n}}}}: the instance-wide match per location and each
    /// worker's own prefix per location. Instances where some worker holds a prefix appear even
    /// when the instance as a whole has none (location None, matched_prefix_length 0).
    #[pyo3(signature = (tokens, **kwargs), text_signature = "(self, tokens)")]
    fn lookup_detailed<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        no_kwargs("lookup_detailed", kwargs)?;
        let tokens = IntsArg::<u32>::extract(tokens, "tokens")?;
        let detail = detached(py, || {
            let t = tokens.view()?;
            Ok(self.inner.read(|c| c.lookup_detailed(&t)))
        })?;
        let out = PyDict::new(py);
        for d in &detail {
            out.set_item(&*d.instance, detail_dict(py, d)?)?;
        }
        Ok(out)
    }

    /// Parse a /lookup body ``{"tokens": [...], ...}`` and return the response body:
    /// ``{"event_id": ..., "layout_info": {inst: [loc, n]}, inst: [loc, n], ...}`` (with
    /// detail: ``"detail": {...lookup_detailed...}`` added). Raises InvalidArgumentError naming
    /// the problem on a malformed body.
    #[pyo3(
        signature = (body, event_id, detail=None, **kwargs),
        text_signature = "(self, body, event_id, detail=False)"
    )]
    fn lookup_json<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyAny>,
        event_id: &Bound<'py, PyAny>,
        detail: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        no_kwargs("lookup_json", kwargs)?;
        let a = self.answer_json(py, body, event_id, detail)?;
        Ok(PyBytes::new(py, a.body.as_bytes()))
    }

    /// ``lookup_json`` and what it matched: (response body, tokens asked, tokens of the
    /// longest prefix any instance holds, 0 without a match), for the hit-ratio metrics.
    #[pyo3(
        signature = (body, event_id, detail=None, **kwargs),
        text_signature = "(self, body, event_id, detail=False)"
    )]
    fn lookup_json_counted<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyAny>,
        event_id: &Bound<'py, PyAny>,
        detail: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(Bound<'py, PyBytes>, u64, u64)> {
        no_kwargs("lookup_json_counted", kwargs)?;
        let a = self.answer_json(py, body, event_id, detail)?;
        Ok((PyBytes::new(py, a.body.as_bytes()), a.asked, a.matched))
    }

    /// The controller's /lookup fast path (rust/http_fast.rs): answer the complete plain
    /// ``POST /lookup`` requests at the start of ``data`` (bytes a connection received), the
    /// n-th answered one with event id ``event_prefix + str(first_id + n)``, with the GIL
    /// released, stopping at the first request it leaves to the general HTTP server. Returns
    /// (responses, bytes consumed, seconds per answered request, whether the last one closes
    /// the connection, lookups that matched, tokens asked, tokens matched). ``extra_header``:
    /// header lines (each ending in CRLF) every response carries. ``leave_named``: field names
    /// that leave a request to the caller when its body gives one of them a value other
    /// than null (``lookup_body_names``). Raises InvalidTypeError when ``data`` or
    /// ``extra_header`` is not bytes or ``leave_named`` not a tuple of str.
    #[pyo3(
        signature = (data, event_prefix, first_id, max_header_bytes, max_body_bytes, extra_header=None, leave_named=None, **kwargs),
        text_signature = "(self, data, event_prefix, first_id, max_header_bytes, max_body_bytes, extra_header=b'', leave_named=())"
    )]
    #[allow(clippy::too_many_arguments)]
    fn answer_lookups<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        event_prefix: &Bound<'py, PyAny>,
        first_id: &Bound<'py, PyAny>,
        max_header_bytes: &Bound<'py, PyAny>,
        max_body_bytes: &Bound<'py, PyAny>,
        extra_header: Option<&Bound<'py, PyAny>>,
        leave_named: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<AnsweredTuple<'py>> {
        no_kwargs("answer_lookups", kwargs)?;
        let names = match leave_named {
            Some(v) => str_tuple(v, "leave_named")?,
            None => Vec::new(),
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let extra: Vec<u8> = match extra_header {
            Some(v) => v
                .cast::<PyBytes>()
                .map_err(|_| Error::ty("extra_header must be bytes"))?
                .as_bytes()
                .to_vec(),
            None => Vec::new(),
        };
        let prefix = str_arg(event_prefix, "event_prefix")?;
        let first_id = int_arg(first_id, "first_id", u64::MAX / 2)?;
        let limits = http_fast::Limits {
            max_header_bytes: int_arg(max_header_bytes, "max_header_bytes", u32::MAX as u64)?
                as usize,
            max_body_bytes: int_arg(max_body_bytes, "max_body_bytes", u32::MAX as u64)? as usize,
        };
        let data = data.cast::<PyBytes>().map_err(|_| {
            Error::ty(format!(
                "data must be bytes, not {}",
                data.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let bytes = data.as_bytes();
        let a = detached(py, || {
            Ok(http_fast::answer_lookups(
                &self.inner,
                bytes,
                &limits,
                &prefix,
                first_id,
                &extra,
                &names,
            ))
        })?;
        Ok((
            PyBytes::new(py, &a.responses),
            a.consumed,
            a.seconds,
            a.close,
            a.hits,
            a.asked_tokens,
            a.matched_tokens,
        ))
    }

    /// An order-independent 64-bit digest of the holdings and registered workers: the
    /// wrapping sum of xxh3_64(b"h" + key u64 LE + worker u32 LE + instance + b"\0" + location)
    /// over every (chunk key, holder) pair plus xxh3_64(b"w" + worker u32 LE + instance) over
    /// every registered worker. Equal for any two indexes that hold the same.
    fn digest(&self, py: Python<'_>) -> PyResult<u64> {
        detached(py, || Ok(self.inner.read(|c| c.content_digest())))
    }

    /// [(instance_id, worker_id, location, chunks held)] for every holder.
    fn holder_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let v = detached(py, || Ok(self.inner.read(|c| c.holder_counts())))?;
        let items: Vec<(String, u32, String, u64)> = v
            .into_iter()
            .map(|(i, w, l, n)| (i.to_string(), w, l.to_string(), n))
            .collect();
        PyList::new(py, items)
    }

    /// {"chunks" (distinct chunk keys), "nodes", "holders", "holdings" ((holder, chunk) pairs),
    /// "instances", "workers", "holder_sets", "bytes" (heap bytes, both copies)}.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = detached(py, || Ok(self.inner.read(|c| c.stats())))?;
        let out = PyDict::new(py);
        for (k, v) in s {
            out.set_item(k, v)?;
        }
        Ok(out)
    }

    /// Raise LMCacheError describing the first broken invariant (a bug, never caused by input).
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || self.inner.check_invariants())
    }

    /// Write a versioned, checksummed snapshot atomically (temp file + fsync + rename).
    /// ``log_seq`` records the position in a replicated operation log that this state
    /// reflects (0: none); ``load`` returns it. Raises OSError naming ``path`` (e.g.
    /// FileNotFoundError with ``.filename``) if it cannot be written; the target is then
    /// untouched.
    #[pyo3(signature = (path, log_seq=None, **kwargs), text_signature = "(self, path, log_seq=0)")]
    fn dump(
        &self,
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        log_seq: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        no_kwargs("dump", kwargs)?;
        let path = path_arg(path, "path")?;
        let log_seq = match log_seq {
            Some(v) => int_arg(v, "log_seq", u64::MAX)?,
            None => 0,
        };
        detached(py, || self.inner.dump(&path, log_seq))
    }

    /// Replace the contents with a snapshot; returns the log position it was dumped with (0
    /// for none, and for files of older format versions). A corrupt, foreign or mismatched
    /// (chunk_size, key space, seed or none_hash) file raises SnapshotError and leaves the
    /// index as it was; a file that cannot be read raises OSError naming ``path`` (e.g.
    /// FileNotFoundError).
    #[pyo3(signature = (path, **kwargs), text_signature = "(self, path)")]
    fn load(
        &self,
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        no_kwargs("load", kwargs)?;
        let path = path_arg(path, "path")?;
        detached(py, || self.inner.load(&path))
    }

    /// Number of distinct chunk keys.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        detached(py, || Ok(self.inner.read(|c| c.table.len())))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let chunks = detached(py, || Ok(self.inner.read(|c| c.table.len())))?;
        Ok(format!(
            "Index(chunk_size={}, {}, chunks={chunks})",
            self.inner.chunk_size(),
            self.inner.key_space(),
        ))
    }
}

fn prefix_err(n: usize, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("events[{n}]: {m}")),
        Error::InvalidType(m) => Error::InvalidType(format!("events[{n}]: {m}")),
        e => e,
    }
}

/// instance_id -> (location, length), as `lookup` and `lookup_keys` return it.
fn matches_dict(py: Python<'_>, matches: Vec<Match>) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    for m in matches {
        out.set_item(&*m.instance, (&*m.location, m.length))?;
    }
    Ok(out)
}
