//! The admin listener: health, the active config, and Prometheus metrics.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::proxy::Shared;

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into()));
    }
    let response = match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" if shared.drain.is_draining() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
        }
        "/ready" => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/config" => {
            let snapshot = shared.snapshot.load();
            let body = serde_json::json!({
                "version": snapshot.version,
                "addresses": shared.addresses(),
                "config": snapshot.config,
            });
            reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", shared.registry.render()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready /live /config /metrics\n".into(),
        ),
    };
    Ok(response)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(ResponseBody::local(body))
        .expect("valid response parts")
}
