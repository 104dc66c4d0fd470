//! `meshpy.Request`, `meshpy.Response` and `meshpy.LogRecord`: what hooks receive and return.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};
use meshpy_dataplane::filter::RequestHead;
use pyo3::exceptions::{PyAttributeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::headers::PyHeaders;

/// An HTTP request on its way through a route's filters.
#[pyclass(module = "meshpy._core", name = "Request")]
pub struct PyRequest {
    method: Method,
    scheme: String,
    authority: String,
    pub(crate) path_and_query: String,
    pub(crate) headers: Py<PyHeaders>,
    client_addr: String,
    identity: Option<String>,
    route: String,
    cluster: String,
    pub(crate) routed_to: Option<String>,
    ctx: Option<Py<PyDict>>,
    /// Only when a filter of the route asked for the body.
    pub(crate) body: Option<Py<PyBytes>>,
}

impl PyRequest {
    pub fn from_head(py: Python<'_>, head: RequestHead) -> PyResult<Self> {
        Ok(Self {
            method: head.method,
            scheme: head.scheme.to_owned(),
            authority: head.authority,
            path_and_query: head.path_and_query,
            headers: Py::new(py, PyHeaders { map: head.headers })?,
            client_addr: head.client_addr,
            identity: head.identity.map(|i| i.to_string()),
            route: head.route.to_string(),
            cluster: head.cluster.to_string(),
            routed_to: None,
            ctx: None,
            body: head.body.map(|b| PyBytes::new(py, &b).unbind()),
        })
    }

    /// The headers as they go upstream: copied when the request lives on for later
    /// phases, else moved out.
    pub fn upstream_headers(&self, py: Python<'_>, keep: bool) -> HeaderMap {
        let mut headers = self.headers.borrow_mut(py);
        if keep {
            headers.map.clone()
        } else {
            std::mem::take(&mut headers.map)
        }
    }

    pub fn upstream_body(&self, py: Python<'_>) -> Option<Bytes> {
        self.body.as_ref().map(|b| Bytes::copy_from_slice(b.as_bytes(py)))
    }

    fn split(&self) -> (&str, Option<&str>) {
        match self.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (&self.path_and_query, None),
        }
    }

    fn set_target(&mut self, path: &str, query: Option<&str>) -> PyResult<()> {
        if !path.starts_with('/') {
            return Err(PyValueError::new_err(format!("a path must start with '/', got {path:?}")));
        }
        let target = match query {
            Some(q) if !q.is_empty() => format!("{path}?{q}"),
            _ => path.to_owned(),
        };
        PathAndQuery::try_from(target.as_str())
            .map_err(|_| PyValueError::new_err(format!("invalid request target {target:?}")))?;
        self.path_and_query = target;
        Ok(())
    }
}

fn parse_qs(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static PARSE_QS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    PARSE_QS.import(py, "urllib.parse", "parse_qs")
}

#[pymethods]
impl PyRequest {
    /// A request for tests (see `meshpy.testing.request`); `path` may carry a query.
    #[new]
    #[pyo3(signature = (
        method="GET", path="/", headers=None, *, body=None, authority="localhost",
        scheme="http", client_addr="127.0.0.1", identity=None, route="test", cluster="test",
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        method: &str,
        path: &str,
        headers: Option<&Bound<'_, PyAny>>,
        body: Option<&Bound<'_, PyAny>>,
        authority: &str,
        scheme: &str,
        client_addr: &str,
        identity: Option<String>,
        route: &str,
        cluster: &str,
    ) -> PyResult<Self> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| PyValueError::new_err(format!("invalid method {method:?}")))?;
        let mut request = Self {
            method,
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
            path_and_query: String::new(),
            headers: Py::new(py, PyHeaders::from_py(headers)?)?,
            client_addr: client_addr.to_owned(),
            identity,
            route: route.to_owned(),
            cluster: cluster.to_owned(),
            routed_to: None,
            ctx: None,
            body: body.map(body_bytes).transpose()?,
        };
        let (path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
        request.set_target(path, query)?;
        Ok(request)
    }

    #[getter]
    fn method(&self) -> &str {
        self.method.as_str()
    }

    #[getter]
    fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The host (and port, when given) the client asked for.
    #[getter]
    fn authority(&self) -> &str {
        &self.authority
    }

    /// The path without the query; setting it changes the path sent upstream.
    #[getter]
    fn path(&self) -> &str {
        self.split().0
    }

    #[setter]
    fn set_path(&mut self, path: &str) -> PyResult<()> {
        let query = self.split().1.map(str::to_owned);
        self.set_target(path, query.as_deref())
    }

    /// The raw query string, without '?'; setting it changes the query sent upstream.
    #[getter]
    fn query_string(&self) -> &str {
        self.split().1.unwrap_or_default()
    }

    #[setter]
    fn set_query_string(&mut self, query: &str) -> PyResult<()> {
        let path = self.split().0.to_owned();
        self.set_target(&path, Some(query))
    }

    /// The query parsed: name -> list of values (a copy; set `query_string` to change it).
    #[getter]
    fn query<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("keep_blank_values", true)?;
        parse_qs(py)?.call((self.query_string(),), Some(&kwargs))
    }

    #[getter]
    fn headers(&self, py: Python<'_>) -> Py<PyHeaders> {
        self.headers.clone_ref(py)
    }

    /// The IP address of the peer that sent the request (the app, for an outbound
    /// listener); `x-forwarded-for` has the hops before it.
    #[getter]
    fn client_addr(&self) -> &str {
        &self.client_addr
    }

    /// The caller's mesh identity (a SPIFFE ID) when it authenticated with mTLS, else None.
    #[getter]
    fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    #[getter]
    fn route(&self) -> &str {
        &self.route
    }

    /// The cluster the request goes to: the route's, or the one chosen with `route_to`.
    #[getter]
    fn cluster(&self) -> &str {
        self.routed_to.as_deref().unwrap_or(&self.cluster)
    }

    /// A dict shared by every hook that sees this request.
    #[getter]
    fn ctx(&mut self, py: Python<'_>) -> Py<PyDict> {
        self.ctx.get_or_insert_with(|| PyDict::new(py).unbind()).clone_ref(py)
    }

    /// The request body, when a filter of the route set `body_limit`; else None.
    #[getter]
    fn body(&self, py: Python<'_>) -> Option<Py<PyBytes>> {
        self.body.as_ref().map(|b| b.clone_ref(py))
    }

    #[setter]
    fn set_body(&mut self, body: &Bound<'_, PyAny>) -> PyResult<()> {
        replace_body(
            &mut self.body,
            body,
            "the body is streamed on this route; set body_limit on the filter to read or replace it",
        )
    }

    /// Sends the request to another cluster of the config instead of the route's.
    fn route_to(&mut self, cluster: &str) -> PyResult<()> {
        if cluster.is_empty() {
            return Err(PyValueError::new_err("expected a cluster name"));
        }
        self.routed_to = Some(cluster.to_owned());
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<Request {} {}{}>", self.method, self.authority, self.path_and_query)
    }
}

/// Replaces a body that is held whole; `streamed` says why there is none to replace.
fn replace_body(slot: &mut Option<Py<PyBytes>>, body: &Bound<'_, PyAny>, streamed: &str) -> PyResult<()> {
    if slot.is_none() {
        return Err(PyAttributeError::new_err(streamed.to_owned()));
    }
    *slot = Some(body_bytes(body)?);
    Ok(())
}

fn body_bytes(body: &Bound<'_, PyAny>) -> PyResult<Py<PyBytes>> {
    if let Ok(bytes) = body.cast::<PyBytes>() {
        return Ok(bytes.clone().unbind());
    }
    if let Ok(text) = body.cast::<PyString>() {
        return Ok(PyBytes::new(body.py(), text.to_str()?.as_bytes()).unbind());
    }
    Err(PyTypeError::new_err(format!("a body must be bytes or str, not {}", body.get_type().name()?)))
}

fn status(code: u16) -> PyResult<StatusCode> {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.as_u16() >= 200 || s.as_u16() == 101)
        .ok_or_else(|| PyValueError::new_err(format!("invalid response status {code}")))
}

/// An HTTP response: one a filter makes to answer by itself, or the upstream's
/// (status and headers only: its body streams past the hooks).
#[pyclass(module = "meshpy._core", name = "Response")]
pub struct PyResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: Py<PyHeaders>,
    /// None for an upstream response.
    pub(crate) body: Option<Py<PyBytes>>,
}

impl PyResponse {
    pub fn upstream(py: Python<'_>, status: StatusCode, headers: HeaderMap) -> PyResult<Self> {
        Ok(Self { status, headers: Py::new(py, PyHeaders { map: headers })?, body: None })
    }
}

#[pymethods]
impl PyResponse {
    #[new]
    #[pyo3(signature = (status=200, body=None, headers=None))]
    fn new(
        py: Python<'_>,
        status: u16,
        body: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let body = match body {
            Some(b) => body_bytes(b)?,
            None => PyBytes::new(py, b"").unbind(),
        };
        Ok(Self {
            status: self::status(status)?,
            headers: Py::new(py, PyHeaders::from_py(headers)?)?,
            body: Some(body),
        })
    }

    #[getter]
    fn status(&self) -> u16 {
        self.status.as_u16()
    }

    #[setter]
    fn set_status(&mut self, status: u16) -> PyResult<()> {
        self.status = self::status(status)?;
        Ok(())
    }

    #[getter]
    fn headers(&self, py: Python<'_>) -> Py<PyHeaders> {
        self.headers.clone_ref(py)
    }

    /// The body of a response made by a filter; None for the upstream's, which streams.
    #[getter]
    fn body(&self, py: Python<'_>) -> Option<Py<PyBytes>> {
        self.body.as_ref().map(|b| b.clone_ref(py))
    }

    #[setter]
    fn set_body(&mut self, body: &Bound<'_, PyAny>) -> PyResult<()> {
        replace_body(&mut self.body, body, "the upstream's body streams to the client and cannot be replaced")
    }

    fn __repr__(&self) -> String {
        format!("<Response {}>", self.status.as_u16())
    }
}

/// What `on_log` hooks receive once the response has been sent.
#[pyclass(module = "meshpy._core", name = "LogRecord", frozen)]
pub struct PyLogRecord {
    #[pyo3(get)]
    pub request: Py<PyRequest>,
    #[pyo3(get)]
    pub status: u16,
    /// Seconds from the request's arrival to the end of its response.
    #[pyo3(get)]
    pub duration: f64,
    /// The cluster the request went to.
    #[pyo3(get)]
    pub cluster: String,
    /// Why the proxy or a filter answered instead of the upstream, else None.
    #[pyo3(get)]
    pub error: Option<String>,
}

#[pymethods]
impl PyLogRecord {
    /// A record for tests (see `meshpy.testing`).
    #[new]
    #[pyo3(signature = (request, status=200, duration=0.0, cluster=None, error=None))]
    fn new(
        py: Python<'_>,
        request: Py<PyRequest>,
        status: u16,
        duration: f64,
        cluster: Option<String>,
        error: Option<String>,
    ) -> Self {
        let cluster = cluster.unwrap_or_else(|| request.borrow(py).cluster().to_owned());
        Self { request, status, duration, cluster, error }
    }

    fn __repr__(&self) -> String {
        format!("<LogRecord {} in {:.3}s>", self.status, self.duration)
    }
}
