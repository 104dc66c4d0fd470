//! `meshpy._core`: the data plane as a Python class. Only type and error mapping
//! lives here; every blocking call runs with the GIL released.

use std::time::Duration;

use meshpy_dataplane::{Config, Error, Proxy as Core};
use meshpy_filters::{chain_handles, runner, PyFilterQueue};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

// The data plane allocates per request and per frame; mimalloc's thread-local heaps
// keep that cheap on every worker thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(_core, CoreError, PyException, "Base class of the data plane's errors.");
create_exception!(_core, CoreConfigError, CoreError, "The data plane refused a configuration.");
create_exception!(_core, ListenError, CoreError, "A listener could not bind its address.");

fn to_py(error: Error) -> PyErr {
    match error {
        Error::Config(message) => CoreConfigError::new_err(message),
        Error::Listen(message) => ListenError::new_err(message),
    }
}

/// A running proxy: tokio worker threads serving every listener of the config.
#[pyclass(module = "meshpy._core", frozen)]
struct Proxy {
    core: Core,
}

#[pymethods]
impl Proxy {
    /// `filters` runs the hooks of the filter chains in `chains` (by the ids the config names).
    #[new]
    #[pyo3(signature = (config_json, filters, chains=None, workers=None))]
    fn new(
        py: Python<'_>,
        config_json: &str,
        filters: &PyFilterQueue,
        chains: Option<&Bound<'_, PyDict>>,
        workers: Option<usize>,
    ) -> PyResult<Self> {
        let config = Config::from_json(config_json).map_err(to_py)?;
        let chains = chain_handles(chains)?;
        let runner = runner(filters);
        let workers = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let core = py.detach(|| Core::start(config, workers, runner, &chains)).map_err(to_py)?;
        Ok(Self { core })
    }

    #[pyo3(signature = (config_json, chains=None))]
    fn reload(&self, py: Python<'_>, config_json: &str, chains: Option<&Bound<'_, PyDict>>) -> PyResult<u64> {
        let config = Config::from_json(config_json).map_err(to_py)?;
        let chains = chain_handles(chains)?;
        py.detach(|| self.core.reload(config, &chains)).map_err(to_py)
    }

    fn record_reload_failure(&self) {
        self.core.record_reload_failure();
    }

    #[getter]
    fn version(&self) -> u64 {
        self.core.version()
    }

    fn addresses(&self) -> std::collections::BTreeMap<String, String> {
        self.core.addresses()
    }

    fn is_running(&self) -> bool {
        self.core.is_running()
    }

    fn shutdown(&self, py: Python<'_>, drain_timeout: f64) {
        let deadline = Duration::from_secs_f64(drain_timeout.max(0.0));
        py.detach(|| self.core.shutdown(deadline));
    }
}

#[pyfunction]
fn init_logging(level: &str) -> PyResult<()> {
    meshpy_dataplane::init_logging(level).map_err(pyo3::exceptions::PyValueError::new_err)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Proxy>()?;
    meshpy_filters::register(m)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add("CoreError", py.get_type::<CoreError>())?;
    m.add("CoreConfigError", py.get_type::<CoreConfigError>())?;
    m.add("ListenError", py.get_type::<ListenError>())?;
    m.add("build_revision", env!("MESHPY_BUILD_REVISION"))?;
    Ok(())
}
