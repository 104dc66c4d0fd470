//! The data plane's half of the filter bridge: what a route with filters hands to
//! the filter runner, and what comes back.
//!
//! The runner (Python, in the binding crate) is opaque here: a chain is an `Any`
//! handle and per-request state an `Any` box. Calls are queued without blocking and
//! answered through a oneshot channel the worker awaits with the chain's time budget,
//! so a slow, stuck or absent runner only ever costs the filtered route that budget.
//! Both directions are batched (see `mailbox`).

mod mailbox;

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use tokio::sync::oneshot;

use crate::config::{FilterChainConfig, OnError};
use crate::metrics::FilterMetrics;

/// The runner's own object for one route's filters (the Python chain).
pub type ChainHandle = Arc<dyn Any + Send + Sync>;
/// The runner's state for one request, kept between its phases (the Python request).
pub type Exchange = Box<dyn Any + Send>;

pub use mailbox::{Mailbox, Reply};

/// Takes filter calls off the workers. Implementations must never block.
pub trait FilterRunner: Send + Sync {
    /// Queues a call without waking the runner, or hands it back when the queue is full.
    fn submit(&self, call: Call) -> Result<(), Box<Call>>;
    /// Makes the runner take the calls queued so far.
    fn wake(&self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
    Log,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Log => "log",
        }
    }
}

/// Why a filter call produced no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// A hook raised.
    Exception,
    /// The chain did not answer within its budget.
    Timeout,
    /// The runner's queue was full, or it is not running.
    Overload,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Overload => "overload",
        }
    }
}

/// One route's filters as the data plane sees them: which phases to call, the body
/// they want, their budget and what to do when they fail.
pub struct FilterChain {
    pub handle: ChainHandle,
    pub names: String,
    pub on_request: bool,
    pub on_response: bool,
    pub on_log: bool,
    pub body_limit: Option<u64>,
    pub timeout: Duration,
    pub on_error: OnError,
    pub metrics: Arc<FilterMetrics>,
}

impl FilterChain {
    pub fn new(config: &FilterChainConfig, handle: ChainHandle, metrics: Arc<FilterMetrics>) -> Self {
        Self {
            handle,
            names: config.names.join(","),
            on_request: config.on_request,
            on_response: config.on_response,
            on_log: config.on_log,
            body_limit: config.body_limit,
            timeout: Duration::from_secs_f64(config.timeout),
            on_error: config.on_error,
            metrics,
        }
    }

    /// Whether the runner must keep its request state for a later phase.
    pub fn keeps_exchange(&self) -> bool {
        self.on_response || self.on_log
    }

    /// Only `on_request` hooks that leave the body alone: the request is all they need.
    pub fn request_only(&self) -> bool {
        self.on_request && !self.keeps_exchange() && self.body_limit.is_none()
    }
}

/// The request as the `on_request` hooks see it.
pub struct RequestHead {
    pub method: Method,
    pub scheme: &'static str,
    pub authority: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// The IP address of the downstream peer.
    pub client_addr: String,
    /// The caller's mesh identity, when it presented one.
    pub identity: Option<Arc<str>>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
}

/// What the log hooks get once the response is over.
pub struct LogRecord {
    pub status: u16,
    pub duration: Duration,
    /// The cluster the request went to, a filter's choice included.
    pub cluster: Arc<str>,
    /// Why the proxy or a filter answered instead of the upstream.
    pub error: Option<String>,
}

/// The request a later phase refers to: the runner's own object when it has one (so
/// state the hooks kept on it carries over), else the request as it was forwarded.
pub enum RequestState {
    Exchange(Exchange),
    Head(Box<RequestHead>),
}

pub enum Call {
    Request {
        chain: Arc<FilterChain>,
        head: RequestHead,
        reply: Reply<RequestVerdict>,
    },
    Response {
        chain: Arc<FilterChain>,
        request: RequestState,
        status: StatusCode,
        headers: HeaderMap,
        reply: Reply<ResponseVerdict>,
    },
    Log {
        chain: Arc<FilterChain>,
        request: RequestState,
        record: LogRecord,
    },
}

/// A failed call: which filter and why, with the request state when the runner kept it.
pub struct Failure {
    pub filter: String,
    pub reason: FailReason,
    pub exchange: Option<Exchange>,
}

pub enum RequestVerdict {
    /// Forward the (possibly rewritten) request.
    Continue {
        exchange: Option<Exchange>,
        headers: HeaderMap,
        path_and_query: String,
        body: Option<Bytes>,
        /// A cluster chosen by a filter instead of the route's.
        cluster: Option<String>,
    },
    /// Answer without contacting the upstream.
    Respond {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    Failed(Failure),
}

pub enum ResponseVerdict {
    Continue { exchange: Exchange, status: StatusCode, headers: HeaderMap },
    Failed(Failure),
}

/// Runs a request-phase call: queue, await within the budget, count the outcome.
pub async fn call_request(
    runner: &Arc<dyn FilterRunner>,
    chain: &Arc<FilterChain>,
    head: RequestHead,
) -> RequestVerdict {
    let (reply, answer) = Reply::new();
    let call = Call::Request { chain: chain.clone(), head, reply };
    match await_answer(runner, chain, Phase::Request, call, answer).await {
        Ok(verdict) => verdict,
        Err(reason) => RequestVerdict::Failed(chain.failure(reason)),
    }
}

pub async fn call_response(
    runner: &Arc<dyn FilterRunner>,
    chain: &Arc<FilterChain>,
    request: RequestState,
    status: StatusCode,
    headers: HeaderMap,
) -> ResponseVerdict {
    let (reply, answer) = Reply::new();
    let call = Call::Response { chain: chain.clone(), request, status, headers, reply };
    match await_answer(runner, chain, Phase::Response, call, answer).await {
        Ok(verdict) => verdict,
        Err(reason) => ResponseVerdict::Failed(chain.failure(reason)),
    }
}

/// Fire and forget: the log phase has no answer to wait for.
pub fn call_log(
    runner: &Arc<dyn FilterRunner>,
    chain: &Arc<FilterChain>,
    request: RequestState,
    record: LogRecord,
) {
    chain.metrics.call(Phase::Log);
    let call = Call::Log { chain: chain.clone(), request, record };
    match runner.submit(call) {
        Ok(()) => mailbox::wake_runner(runner),
        Err(_) => chain.metrics.failure(Phase::Log, &chain.names, FailReason::Overload),
    }
}

async fn await_answer<T>(
    runner: &Arc<dyn FilterRunner>,
    chain: &FilterChain,
    phase: Phase,
    call: Call,
    answer: oneshot::Receiver<T>,
) -> Result<T, FailReason> {
    let started = Instant::now();
    chain.metrics.call(phase);
    let result = match runner.submit(call) {
        Err(_) => Err(FailReason::Overload),
        Ok(()) => {
            mailbox::wake_runner(runner);
            match tokio::time::timeout(chain.timeout, answer).await {
                Ok(Ok(answer)) => Ok(answer),
                // The runner dropped the call unanswered: it is shutting down.
                Ok(Err(_)) => Err(FailReason::Overload),
                Err(_) => Err(FailReason::Timeout),
            }
        }
    };
    chain.metrics.latency(phase, started.elapsed());
    if let Err(reason) = result {
        chain.metrics.failure(phase, &chain.names, reason);
    }
    result
}

impl FilterChain {
    fn failure(&self, reason: FailReason) -> Failure {
        Failure { filter: self.names.clone(), reason, exchange: None }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            FailReason::Exception => write!(f, "filter {} raised an exception", self.filter),
            FailReason::Timeout => write!(f, "filter {} did not finish within its time budget", self.filter),
            FailReason::Overload => {
                write!(f, "filter {} could not be run: the filter queue is full", self.filter)
            }
        }
    }
}

/// Calls the route's log hooks when dropped, which for a response body is once it has
/// been sent whole or the client went away: after the exchange, off its path.
pub struct LogOnDrop {
    pending: Option<PendingLog>,
    started: Instant,
}

struct PendingLog {
    runner: Arc<dyn FilterRunner>,
    chain: Arc<FilterChain>,
    request: RequestState,
    record: LogRecord,
}

impl LogOnDrop {
    pub fn new(
        runner: Arc<dyn FilterRunner>,
        chain: Arc<FilterChain>,
        request: RequestState,
        record: LogRecord,
        started: Instant,
    ) -> Self {
        Self { pending: Some(PendingLog { runner, chain, request, record }), started }
    }
}

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        if let Some(PendingLog { runner, chain, request, mut record }) = self.pending.take() {
            record.duration = self.started.elapsed();
            call_log(&runner, &chain, request, record);
        }
    }
}
