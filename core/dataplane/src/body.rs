//! Bodies streamed through the proxy, frame by frame, never buffered whole.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::balance::InFlight;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The request body exceeded the listener's `max_body_bytes`.
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body larger than {} bytes", self.0)
    }
}

impl StdError for BodyTooLarge {}

/// The downstream request body on its way upstream, cut off past the size limit.
/// `None` stands for an empty body, used when a bodiless request is retried.
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self { inner: Some(inner), limit, seen: 0 }
    }

    pub fn empty() -> Self {
        Self { inner: None, limit: None, seen: 0 }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(limit), Some(data)) = (this.limit, frame.data_ref()) {
                    this.seen += data.len() as u64;
                    if this.seen > limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

pin_project! {
    /// The body sent back downstream: the upstream's, or one the proxy made itself.
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Upstream {
            #[pin]
            inner: Incoming,
            // Keeps the endpoint's request counted as in flight until the body ends.
            in_flight: Option<InFlight>,
        },
        Local { data: Option<Bytes> },
    }
}

impl ResponseBody {
    pub fn upstream(inner: Incoming, in_flight: InFlight) -> Self {
        Self::Upstream { inner, in_flight: Some(in_flight) }
    }

    pub fn local(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self::Local { data: (!data.is_empty()).then_some(data) }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ResponseBodyProj::Upstream { inner, in_flight } => {
                let poll = inner.poll_frame(cx);
                if matches!(poll, Poll::Ready(None | Some(Err(_)))) {
                    in_flight.take();
                }
                poll.map(|frame| frame.map(|r| r.map_err(BoxError::from)))
            }
            ResponseBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { inner, .. } => inner.is_end_stream(),
            Self::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { inner, .. } => inner.size_hint(),
            Self::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
