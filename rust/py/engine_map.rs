//! `lmcache_rs.EngineMap`, `parse_kv_batch` and what they hand back: one engine's block map
//! and KV-event payloads parsed without Python objects (see engine_map.rs, kv_payload.rs).

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyTuple};
use xxhash_rust::xxh3::xxh3_64;

use crate::engine_map::{EngineHash, EngineMap, OpKind, PendingOp, Store};
use crate::index::{Batch, Event, EventKind};
use crate::kv_payload::{self, Parsed};
use crate::py::convert::IntsArg;
use crate::py::index::PyIndex;

fn hash_arg(obj: &Bound<'_, PyAny>) -> PyResult<EngineHash> {
    if obj.is_exact_instance_of::<PyInt>() {
        return Ok(EngineHash::from_int(obj.extract::<i128>()?));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(EngineHash::Bytes(b.as_bytes().into()));
    }
    Err(PyTypeError::new_err("a block hash is an int or bytes"))
}

fn hashes_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<EngineHash>> {
    obj.try_iter()?.map(|h| hash_arg(&h?)).collect()
}

fn hash_object<'py>(py: Python<'py>, h: &EngineHash) -> PyResult<Bound<'py, PyAny>> {
    Ok(match h {
        EngineHash::Int(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Neg(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Bytes(b) => PyBytes::new(py, b).into_any(),
    })
}

/// A KV-event batch parsed in Rust (token ids stay Rust memory), ready for
/// ``EngineMap.apply_parsed``.
#[pyclass(name = "ParsedBatch", module = "lmcache_rs._core", frozen)]
pub struct PyParsedBatch {
    parsed: Parsed,
    digest: u64,
}

#[pymethods]
impl PyParsedBatch {
    #[getter]
    fn ts(&self) -> f64 {
        self.parsed.ts
    }

    #[getter]
    fn dp_rank(&self) -> u16 {
        self.parsed.dp_rank
    }

    /// xxh3 of the payload: tells a repeated message from a new one (faster than ``hash``).
    #[getter]
    fn digest(&self) -> u64 {
        self.digest
    }

    /// Block sizes of the stores without a parent, first seen first: their namespaces must
    /// exist before the batch is applied.
    #[getter]
    fn root_sizes(&self) -> Vec<usize> {
        self.parsed.root_sizes()
    }

    /// Whether an ``AllBlocksCleared`` is among the events.
    #[getter]
    fn cleared(&self) -> bool {
        self.parsed.cleared()
    }

    fn __len__(&self) -> usize {
        self.parsed.events.len()
    }
}

/// The batch in ``payload`` when it has the common shape (map-tagged ``BlockStored`` /
/// ``BlockRemoved`` / ``AllBlocksCleared`` of the main attention group, no LoRA, text only,
/// known fields); ``None`` for anything else, including malformed payloads.
#[pyfunction]
pub fn parse_kv_batch(py: Python<'_>, payload: &[u8]) -> Option<PyParsedBatch> {
    // releasing the GIL costs more than parsing a usual (few kB) payload
    let parse = || kv_payload::parse(payload).map(|p| (p, xxh3_64(payload)));
    let parsed = if payload.len() < 1 << 16 {
        parse()
    } else {
        py.detach(parse)
    };
    parsed.map(|(parsed, digest)| PyParsedBatch { parsed, digest })
}

/// One namespace's index operations from an ``EngineMap``.
#[pyclass(name = "EngineOps", module = "lmcache_rs._core", frozen)]
pub struct PyEngineOps {
    batch: Arc<Batch>,
}

#[pymethods]
impl PyEngineOps {
    /// Apply to ``index`` as one ``apply_batch``; returns (admitted, evicted). An ``Index`` takes
    /// the operations as they are; any other object with an ``apply_batch`` (an index that also
    /// records what it applies) is handed them in ``apply_batch``'s form.
    fn apply_to(&self, index: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
        if let Ok(index) = index.cast::<PyIndex>() {
            return index.borrow().write_batch(index.py(), self.batch.clone());
        }
        index
            .call_method1("apply_batch", (self.as_tuples(index.py())?,))?
            .extract()
    }

    /// Queue for ``index``'s write-behind thread (``Index.apply_batch_later``); the counts come
    /// from ``index.settle()``. Only an ``Index`` that writes behind takes this: an index that
    /// records what it applies takes ``apply_to``.
    fn apply_later(&self, index: &Bound<'_, PyAny>) -> PyResult<()> {
        let index = index.cast::<PyIndex>().map_err(|_| {
            crate::error::Error::ty(
                "apply_later takes an lmcache_rs.Index (use apply_to for others)",
            )
        })?;
        index
            .borrow()
            .write_batch_later(index.py(), self.batch.clone())
    }

    /// One ``EngineOps`` doing what ``ops`` do applied one after another (of one namespace,
    /// typically from several engines): queued as one write, it wakes the index's writer once.
    #[staticmethod]
    fn join(ops: Vec<PyRef<'_, PyEngineOps>>) -> PyEngineOps {
        let batches: Vec<Arc<Batch>> = ops.iter().map(|o| o.batch.clone()).collect();
        PyEngineOps {
            batch: Arc::new(Batch::join(&batches)),
        }
    }

    /// The operations in ``Index.apply_batch``'s form.
    fn as_tuples<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.batch
            .events
            .iter()
            .map(|e| {
                let (kind, loc) = match e.kind {
                    EventKind::Admit => ("admit", Some(&*e.location)),
                    EventKind::Evict => ("evict", Some(&*e.location)),
                    EventKind::Drop => ("drop", Some(&*e.location)),
                    EventKind::DropAll => ("drop", None),
                };
                let keys = PyList::new(py, &self.batch.keys[e.start..e.end])?;
                (kind, &*e.instance, e.worker, loc, keys).into_pyobject(py)
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.batch.events.len()
    }
}

/// One engine's blocks: engine block hash -> (namespace number, our key, locations). Changes
/// queue index operations per namespace (``take_pending``); what cannot be applied is added to
/// ``counts`` by reason.
#[pyclass(name = "EngineMap", module = "lmcache_rs._core")]
pub struct PyEngineMap {
    instance: Arc<str>,
    map: EngineMap,
    counts: Py<PyDict>,
}

impl PyEngineMap {
    fn flush_counts(&mut self, py: Python<'_>) -> PyResult<()> {
        let c = std::mem::take(&mut self.map.counts);
        let counts = self.counts.bind(py);
        for (name, n) in c.named() {
            if n > 0 {
                let before: u64 = match counts.get_item(name)? {
                    Some(v) => v.extract()?,
                    None => 0,
                };
                counts.set_item(name, before + n)?;
            }
        }
        Ok(())
    }

    fn batch_of(&self, ops: Vec<PendingOp>) -> Batch {
        let mut batch = Batch::default();
        let empty: Arc<str> = "".into();
        for op in ops {
            let (kind, location) = match op.kind {
                OpKind::Admit => (
                    EventKind::Admit,
                    self.map.location_name(op.location).clone(),
                ),
                OpKind::Evict => (
                    EventKind::Evict,
                    self.map.location_name(op.location).clone(),
                ),
                OpKind::Drop => (EventKind::DropAll, empty.clone()),
            };
            let start = batch.keys.len();
            batch.keys.extend_from_slice(&op.keys);
            batch.events.push(Event {
                kind,
                instance: self.instance.clone(),
                worker: 0,
                location,
                start,
                end: batch.keys.len(),
            });
        }
        batch
    }
}

#[pymethods]
impl PyEngineMap {
    #[new]
    fn new(instance_id: &str, seed: u64, counts: Bound<'_, PyDict>) -> Self {
        PyEngineMap {
            instance: instance_id.into(),
            map: EngineMap::new(seed),
            counts: counts.unbind(),
        }
    }

    #[getter]
    fn instance_id(&self) -> &str {
        &self.instance
    }

    fn __len__(&self) -> usize {
        self.map.len()
    }

    /// A store with tokens, checked by the caller: ``block_size >= 1`` and whole blocks of
    /// every hash. ``namespace``: where a store without parent goes; ``usable``: how many
    /// leading blocks are plain text (the rest are counted as multimodal).
    #[pyo3(signature = (hashes, parent, token_ids, block_size, location, namespace, usable))]
    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        parent: &Bound<'_, PyAny>,
        token_ids: &Bound<'_, PyAny>,
        block_size: usize,
        location: &str,
        namespace: Option<u32>,
        usable: usize,
    ) -> PyResult<()> {
        let hashes = hashes_arg(hashes)?;
        let parent = if parent.is_none() {
            None
        } else {
            Some(hash_arg(parent)?)
        };
        // tokens that are not all u32 (e.g. bigram pairs) make the event malformed
        let tokens = IntsArg::<u32>::extract(token_ids, "tokens")
            .ok()
            .and_then(|t| t.view().ok().map(|v| v.into_owned()));
        let location = self.map.location(location);
        self.map.store(&Store {
            hashes: &hashes,
            parent: parent.as_ref(),
            tokens: tokens.as_deref(),
            block_size,
            location,
            root_namespace: namespace,
            usable,
        });
        self.flush_counts(py)
    }

    /// A store without tokens: known blocks gain ``location``.
    fn tier_update(
        &mut self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        location: &str,
    ) -> PyResult<()> {
        let hashes = hashes_arg(hashes)?;
        let location = self.map.location(location);
        self.map.tier_update(&hashes, location);
        self.flush_counts(py)
    }

    fn remove(
        &mut self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        location: &str,
    ) -> PyResult<()> {
        let hashes = hashes_arg(hashes)?;
        let location = self.map.location(location);
        self.map.remove(&hashes, location);
        self.flush_counts(py)
    }

    /// Everything is gone: one drop per namespace held.
    fn clear(&mut self) {
        self.map.clear();
    }

    /// Forget every block and the operations not yet taken, without operations.
    fn forget(&mut self) {
        self.map.forget();
    }

    /// Where parsed stores without a parent of ``block_size`` go.
    fn set_root_namespace(&mut self, block_size: usize, namespace: u32) {
        self.map.set_root_namespace(block_size, namespace);
    }

    /// Apply a parsed batch. When a block size its stores start with has no namespace yet
    /// (``set_root_namespace``), nothing is applied and those sizes are returned.
    fn apply_parsed(&mut self, py: Python<'_>, batch: &PyParsedBatch) -> PyResult<Vec<usize>> {
        let map = &mut self.map;
        let missing = if batch.parsed.tokens.len() < 1 << 14 {
            map.apply_parsed(&batch.parsed)
        } else {
            py.detach(|| map.apply_parsed(&batch.parsed))
        };
        self.flush_counts(py)?;
        Ok(missing)
    }

    /// The index operations queued since the last call: (namespace number, operations), in
    /// the order the namespaces were first touched.
    fn take_pending(&mut self) -> Vec<(u32, PyEngineOps)> {
        let pending = self.map.take_pending();
        pending
            .into_iter()
            .map(|(ns, ops)| {
                let batch = Arc::new(self.batch_of(ops));
                (ns, PyEngineOps { batch })
            })
            .collect()
    }

    /// Namespace numbers this engine holds blocks in.
    fn namespaces_held(&self) -> Vec<u32> {
        self.map.namespaces_held()
    }

    /// Every block: {engine hash: (namespace number, key, locations)} (a copy).
    fn holdings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (h, ns, key, locs) in self.map.holdings() {
            let locs = PyTuple::new(py, locs.iter().map(|l| &**l))?;
            out.set_item(hash_object(py, h)?, (ns, key, locs))?;
        }
        Ok(out)
    }
}
