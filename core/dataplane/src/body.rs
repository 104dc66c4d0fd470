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
use crate::pool::Checkout;

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
pub struct RequestBody {
    inner: Incoming,
    limit: Option<u64>,
    seen: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self { inner, limit, seen: 0 }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
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
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
            // The HTTP/1.1 connection, returned to its pool once the body has ended.
            checkout: Option<Checkout>,
        },
        Local { data: Option<Bytes> },
    }
}

impl ResponseBody {
    pub fn upstream(inner: Incoming, in_flight: InFlight, mut checkout: Option<Checkout>) -> Self {
        // An empty body may never be polled: the connection is free already.
        if inner.is_end_stream() {
            if let Some(free) = checkout.take() {
                free.release();
            }
        }
        Self::Upstream { inner, in_flight: Some(in_flight), checkout }
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
            ResponseBodyProj::Upstream { mut inner, in_flight, checkout } => {
                let poll = inner.as_mut().poll_frame(cx);
                // Readers that know the length stop polling after the last byte, so
                // the end is noticed here rather than waiting for a final `None`.
                let ended = match &poll {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    Poll::Ready(Some(Err(_))) => {
                        in_flight.take();
                        checkout.take();
                        false
                    }
                    Poll::Pending => false,
                };
                if ended {
                    in_flight.take();
                    if let Some(free) = checkout.take() {
                        free.release();
                    }
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
