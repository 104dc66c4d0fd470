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
use crate::filter::LogOnDrop;
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

/// The downstream request body on its way upstream: streamed and cut off past the
/// size limit, or already read whole because a filter asked for it.
pub enum RequestBody {
    Streaming { inner: Incoming, limit: Option<u64>, seen: u64 },
    Buffered(Option<Bytes>),
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self::Streaming { inner, limit, seen: 0 }
    }

    pub fn buffered(data: Bytes) -> Self {
        Self::Buffered((!data.is_empty()).then_some(data))
    }
}

/// Why a request body could not be read whole.
pub enum ReadError {
    TooLarge(u64),
    Client(hyper::Error),
}

/// Reads a request body whole, refusing it past `limit` bytes without reading further.
pub async fn read_to_limit(mut body: Incoming, limit: u64) -> Result<Bytes, ReadError> {
    use http_body_util::BodyExt;
    if body.size_hint().lower() > limit {
        return Err(ReadError::TooLarge(limit));
    }
    let mut data = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame.map_err(ReadError::Client)?.into_data() {
            if (data.len() + chunk.len()) as u64 > limit {
                return Err(ReadError::TooLarge(limit));
            }
            data.extend_from_slice(&chunk);
        }
    }
    Ok(data.freeze())
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (inner, limit, seen) = match &mut *self {
            Self::Streaming { inner, limit, seen } => (inner, *limit, seen),
            Self::Buffered(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(limit), Some(data)) = (limit, frame.data_ref()) {
                    *seen += data.len() as u64;
                    if *seen > limit {
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
        match self {
            Self::Streaming { inner, .. } => inner.is_end_stream(),
            Self::Buffered(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streaming { inner, .. } => inner.size_hint(),
            Self::Buffered(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
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
        // Any of the above, with the route's log hooks called once it is dropped.
        Logged { inner: Box<ResponseBody>, log: LogOnDrop },
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

    pub fn logged(self, log: LogOnDrop) -> Self {
        Self::Logged { inner: Box::new(self), log }
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
            ResponseBodyProj::Logged { inner, .. } => Pin::new(&mut **inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { inner, .. } => inner.is_end_stream(),
            Self::Local { data } => data.is_none(),
            Self::Logged { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { inner, .. } => inner.size_hint(),
            Self::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Logged { inner, .. } => inner.size_hint(),
        }
    }
}
