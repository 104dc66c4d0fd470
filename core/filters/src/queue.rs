//! The queue between the tokio workers and the Python thread that runs hooks.
//!
//! Workers push without blocking and never touch Python: a full queue hands the call
//! back. The Python thread sleeps in its event loop on the read end of a socket pair;
//! the first wake after it last drained writes one byte there, and it then takes
//! every pending call in one GIL acquisition. Its verdicts go to the workers'
//! mailboxes, which `flush` wakes once it has answered what it took.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::header::{HeaderValue, CONTENT_TYPE};
use meshpy_dataplane::filter::{
    Call, FailReason, Failure, FilterChain, FilterRunner, Mailbox, Phase, Reply, RequestState,
    RequestVerdict, ResponseVerdict,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::message::{PyLogRecord, PyRequest, PyResponse};

/// The Python object a chain handle carries.
pub struct ChainObject(pub Py<PyAny>);

pub struct Queue {
    calls: Mutex<VecDeque<Call>>,
    capacity: usize,
    /// Set when a wake-up byte is pending, so a burst of pushes writes one byte.
    notified: AtomicBool,
    closed: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    /// Mailboxes holding verdicts posted since the last `flush`.
    to_flush: Mutex<Vec<Arc<Mailbox>>>,
}

impl Queue {
    /// Sends a verdict; its mailbox, if it needs waking, is woken by the next `flush`.
    fn answer<T: Send + 'static>(&self, reply: Reply<T>, verdict: T) {
        if let Some(mailbox) = reply.send(verdict) {
            self.to_flush.lock().unwrap().push(mailbox);
        }
    }
}

impl FilterRunner for Queue {
    fn submit(&self, call: Call) -> Result<(), Box<Call>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Box::new(call));
        }
        {
            let mut calls = self.calls.lock().unwrap();
            if calls.len() >= self.capacity {
                return Err(Box::new(call));
            }
            calls.push_back(call);
        }
        Ok(())
    }

    fn wake(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            // Non-blocking; a full socket buffer already means a wake-up is pending.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }
}

/// The Python side's handle on the queue: its wake-up descriptor and a way to take calls.
#[pyclass(module = "meshpy._core", name = "FilterQueue", frozen)]
pub struct PyFilterQueue {
    pub queue: Arc<Queue>,
}

#[pymethods]
impl PyFilterQueue {
    #[new]
    #[pyo3(signature = (capacity=4096))]
    fn new(capacity: usize) -> PyResult<Self> {
        if capacity == 0 {
            return Err(PyValueError::new_err("capacity must be at least 1"));
        }
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        wake_tx.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        wake_rx.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let queue = Queue {
            calls: Mutex::new(VecDeque::new()),
            capacity,
            notified: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            to_flush: Mutex::new(Vec::new()),
        };
        Ok(Self { queue: Arc::new(queue) })
    }

    /// Readable when calls are waiting.
    fn fileno(&self) -> i32 {
        self.queue.wake_rx.as_raw_fd()
    }

    /// Takes up to `max` waiting calls, oldest first.
    fn take(&self, py: Python<'_>, max: usize) -> PyResult<Vec<Py<PyFilterCall>>> {
        let queue = &self.queue;
        // Empty the wake-up socket before clearing the flag: a push from then on writes a
        // fresh byte, and every push before it is in the queue taken below.
        let mut sink = [0u8; 64];
        loop {
            match (&queue.wake_rx).read(&mut sink) {
                Ok(n) if n == sink.len() => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        queue.notified.store(false, Ordering::Release);
        let taken: Vec<Call> = {
            let mut calls = queue.calls.lock().unwrap();
            let n = max.min(calls.len());
            calls.drain(..n).collect()
        };
        if taken.len() == max && !queue.notified.swap(true, Ordering::AcqRel) {
            // More may be waiting: stay readable so the event loop comes back.
            let _ = (&queue.wake_tx).write(&[1]);
        }
        taken.into_iter().map(|call| Py::new(py, PyFilterCall::from_call(py, call, queue)?)).collect()
    }

    /// Delivers the verdicts given since the last flush: one wake-up per worker that
    /// has any, so a batch of answers costs each worker one.
    fn flush(&self) {
        let mailboxes = std::mem::take(&mut *self.queue.to_flush.lock().unwrap());
        for mailbox in mailboxes {
            mailbox.wake();
        }
    }

    /// Refuses further calls and drops those waiting; their requests see the queue as full.
    fn close(&self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.calls.lock().unwrap().clear();
    }

    /// Calls waiting now.
    fn __len__(&self) -> usize {
        self.queue.calls.lock().unwrap().len()
    }
}

enum Pending {
    Request(Reply<RequestVerdict>),
    Response(Reply<ResponseVerdict>),
    Log,
    Done,
}

/// One pending hook call: the request phase, the response phase, or the log phase.
#[pyclass(module = "meshpy._core", name = "FilterCall")]
pub struct PyFilterCall {
    queue: Arc<Queue>,
    chain: Arc<FilterChain>,
    #[pyo3(get)]
    request: Py<PyRequest>,
    #[pyo3(get)]
    response: Option<Py<PyResponse>>,
    #[pyo3(get)]
    record: Option<Py<PyLogRecord>>,
    reply: Pending,
}

fn request_object(py: Python<'_>, state: RequestState) -> PyResult<Py<PyRequest>> {
    match state {
        RequestState::Exchange(exchange) => match exchange.downcast::<Py<PyRequest>>() {
            Ok(request) => Ok(*request),
            Err(_) => Err(PyRuntimeError::new_err("a request state of another runner")),
        },
        RequestState::Head(head) => Py::new(py, PyRequest::from_head(py, *head)?),
    }
}

impl PyFilterCall {
    fn from_call(py: Python<'_>, call: Call, queue: &Arc<Queue>) -> PyResult<Self> {
        let queue = queue.clone();
        Ok(match call {
            Call::Request { chain, head, reply } => Self {
                queue,
                chain,
                request: Py::new(py, PyRequest::from_head(py, head)?)?,
                response: None,
                record: None,
                reply: Pending::Request(reply),
            },
            Call::Response { chain, request, status, headers, reply } => Self {
                queue,
                chain,
                request: request_object(py, request)?,
                response: Some(Py::new(py, PyResponse::upstream(py, status, headers)?)?),
                record: None,
                reply: Pending::Response(reply),
            },
            Call::Log { chain, request, record } => {
                let request = request_object(py, request)?;
                let record = PyLogRecord {
                    request: request.clone_ref(py),
                    status: record.status,
                    duration: record.duration.as_secs_f64(),
                    cluster: record.cluster.to_string(),
                    error: record.error,
                };
                Self {
                    queue,
                    chain,
                    request,
                    response: None,
                    record: Some(Py::new(py, record)?),
                    reply: Pending::Log,
                }
            }
        })
    }

    fn phase(&self) -> Phase {
        match self.reply {
            Pending::Request(_) => Phase::Request,
            Pending::Response(_) => Phase::Response,
            Pending::Log | Pending::Done => Phase::Log,
        }
    }

    fn exchange(&self, py: Python<'_>) -> Box<dyn std::any::Any + Send> {
        Box::new(self.request.clone_ref(py))
    }
}

#[pymethods]
impl PyFilterCall {
    /// "request", "response" or "log".
    #[getter]
    fn phase_name(&self) -> &'static str {
        self.phase().as_str()
    }

    /// The Python chain object the route was configured with.
    #[getter]
    fn chain(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.chain.handle.downcast_ref::<ChainObject>() {
            Some(chain) => Ok(chain.0.clone_ref(py)),
            None => Err(PyRuntimeError::new_err("a filter chain of another runner")),
        }
    }

    /// Seconds this phase may take, queueing included.
    #[getter]
    fn timeout(&self) -> f64 {
        self.chain.timeout.as_secs_f64()
    }

    /// Whether the proxy stopped waiting (the budget ran out): the answer is no longer wanted.
    fn expired(&self) -> bool {
        match &self.reply {
            Pending::Request(reply) => reply.is_closed(),
            Pending::Response(reply) => reply.is_closed(),
            Pending::Log => false,
            Pending::Done => true,
        }
    }

    /// Lets the exchange go on with the request or response as the hooks left it.
    fn proceed(&mut self, py: Python<'_>) -> PyResult<()> {
        match std::mem::replace(&mut self.reply, Pending::Done) {
            Pending::Request(reply) => {
                let keep = self.chain.keeps_exchange();
                let request = self.request.borrow(py);
                let verdict = RequestVerdict::Continue {
                    exchange: keep.then(|| self.exchange(py)),
                    headers: request.upstream_headers(py, keep),
                    path_and_query: request.path_and_query.clone(),
                    body: request.upstream_body(py),
                    cluster: request.routed_to.clone(),
                };
                self.queue.answer(reply, verdict);
            }
            Pending::Response(reply) => {
                let response = self.response.as_ref().expect("a response-phase call has a response");
                let response = response.borrow(py);
                let headers = std::mem::take(&mut response.headers.borrow_mut(py).map);
                let verdict = ResponseVerdict::Continue {
                    exchange: self.exchange(py),
                    status: response.status,
                    headers,
                };
                self.queue.answer(reply, verdict);
            }
            Pending::Log | Pending::Done => {}
        }
        Ok(())
    }

    /// Answers the request with `response`; the upstream is never contacted.
    fn respond(&mut self, py: Python<'_>, response: PyRef<'_, PyResponse>) -> PyResult<()> {
        let Pending::Request(reply) = std::mem::replace(&mut self.reply, Pending::Done) else {
            return Err(PyRuntimeError::new_err("only the request phase can answer with its own response"));
        };
        let mut headers = response.headers.borrow(py).map.clone();
        let body = response
            .body
            .as_ref()
            .map_or(bytes::Bytes::new(), |b| bytes::Bytes::copy_from_slice(b.as_bytes(py)));
        if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        }
        self.queue.answer(reply, RequestVerdict::Respond { status: response.status, headers, body });
        Ok(())
    }

    /// Reports that the hook of `filter` raised: counted, and the route's `on_error` decides.
    fn fail(&mut self, py: Python<'_>, filter: &str) {
        let phase = self.phase();
        self.chain.metrics.failure(phase, filter, FailReason::Exception);
        let failure = Failure { filter: filter.to_owned(), reason: FailReason::Exception, exchange: None };
        match std::mem::replace(&mut self.reply, Pending::Done) {
            Pending::Request(reply) => {
                let exchange = self.chain.keeps_exchange().then(|| self.exchange(py));
                self.queue.answer(reply, RequestVerdict::Failed(Failure { exchange, ..failure }));
            }
            Pending::Response(reply) => {
                let verdict =
                    ResponseVerdict::Failed(Failure { exchange: Some(self.exchange(py)), ..failure });
                self.queue.answer(reply, verdict);
            }
            Pending::Log | Pending::Done => {}
        }
    }
}
