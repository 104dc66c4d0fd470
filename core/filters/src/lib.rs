//! The Python half of the filter bridge: the objects hooks see (`Request`,
//! `Response`, `Headers`, `LogRecord`) and the queue that carries calls from the
//! tokio workers to the Python thread running the hooks. The workers never take
//! the GIL; everything here that touches Python runs on that thread.

mod headers;
mod message;
mod queue;

use std::collections::HashMap;
use std::sync::Arc;

use meshpy_dataplane::filter::{ChainHandle, FilterRunner};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub use queue::PyFilterQueue;

/// Adds the filter classes to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<headers::PyHeaders>()?;
    m.add_class::<message::PyRequest>()?;
    m.add_class::<message::PyResponse>()?;
    m.add_class::<message::PyLogRecord>()?;
    m.add_class::<queue::PyFilterQueue>()?;
    m.add_class::<queue::PyFilterCall>()?;
    Ok(())
}

/// The runner behind a queue, for the data plane.
pub fn runner(queue: &PyFilterQueue) -> Arc<dyn FilterRunner> {
    queue.queue.clone()
}

/// `{chain id: Python chain object}` as the data plane's chain handles.
pub fn chain_handles(chains: Option<&Bound<'_, PyDict>>) -> PyResult<HashMap<u64, ChainHandle>> {
    let mut handles = HashMap::new();
    for (id, chain) in chains.into_iter().flat_map(|c| c.iter()) {
        let handle: ChainHandle = Arc::new(queue::ChainObject(chain.unbind()));
        handles.insert(id.extract::<u64>()?, handle);
    }
    Ok(handles)
}
