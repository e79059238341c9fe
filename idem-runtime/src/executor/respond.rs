//! The responses the executor builds itself (replays and problems), and the capture of a
//! handler's response for recording.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt as _;

use super::lease::Lease;
use super::outcome;
use crate::config::Idempotency;
use crate::outage::Failure;
use crate::problem::{Problem, ProblemKind};
use crate::record::{RecordedResult, StoredResponse};
use crate::store::{Cached, StoreError};

/// The response header marking a replayed response: `Idempotent-Replayed: true`.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The response header marking a response produced without idempotency because the store was
/// unavailable and the runtime fails open: `Idempotent-Unprotected: true`.
pub static IDEMPOTENT_UNPROTECTED: HeaderName = HeaderName::from_static("idempotent-unprotected");

/// The response header on a replay naming the request that produced the recorded response (the
/// value of the runtime's request-id header, when one is configured): `Original-Request`.
pub static ORIGINAL_REQUEST: HeaderName = HeaderName::from_static("original-request");

/// How long a client is told to wait before retrying a request still in progress.
const IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a client is told to wait when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Answers with what process memory holds: a replay, or a mismatch.
pub(super) fn cached(runtime: &Idempotency, answer: Cached) -> Response {
    match answer {
        Cached::Completed { result, ttl_left } => replay(runtime, &result, ttl_left),
        Cached::Mismatch => key_reused(runtime),
    }
}

/// Answers with a recorded result. A result recorded as not replayable is a `409` whose
/// `Retry-After` is when the record expires and the key runs again.
pub(super) fn replay(
    runtime: &Idempotency,
    result: &RecordedResult,
    ttl_left: Duration,
) -> Response {
    let RecordedResult::Response(stored) = result else {
        outcome("unavailable");
        let problem = Problem::of(ProblemKind::ResultUnavailable).with_retry_after(ttl_left);
        return runtime.problem_response(&problem);
    };
    outcome("replayed");
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

/// `422`: the key was first used for another request.
pub(super) fn key_reused(runtime: &Idempotency) -> Response {
    outcome("mismatch");
    runtime.problem_response(&Problem::of(ProblemKind::KeyReused))
}

/// `409`: a duplicate is in flight; retry within a second, or sooner if its lease ends sooner.
pub(super) fn in_progress(runtime: &Idempotency, lease_left: Duration) -> Response {
    outcome("conflict");
    let problem = Problem::of(ProblemKind::RequestInProgress)
        .with_retry_after(IN_PROGRESS_RETRY_AFTER.min(lease_left));
    runtime.problem_response(&problem)
}

/// `503`: the store could not be asked, and the runtime fails closed.
pub(super) fn store_unavailable(runtime: &Idempotency, error: &StoreError) -> Response {
    outcome("store_error");
    runtime.outage().failure(Failure::Refused, error);
    let problem = Problem::of(ProblemKind::StoreUnavailable).with_retry_after(STORE_RETRY_AFTER);
    runtime.problem_response(&problem)
}

/// `503`: the handler's transaction could not be committed, so its writes and the claim rolled
/// back; the request was not processed and a retry runs cleanly.
pub(super) fn transaction_failed(runtime: &Idempotency, error: &StoreError) -> Response {
    outcome("store_error");
    tracing::warn!(%error, "committing the handler's transaction failed: answered 503");
    let problem = Problem::of(ProblemKind::StoreUnavailable).with_retry_after(STORE_RETRY_AFTER);
    runtime.problem_response(&problem)
}

/// `503`: as many handlers run detached from their requests as the runtime allows.
pub(super) fn too_many_detached(runtime: &Idempotency) -> Response {
    outcome("overloaded");
    tracing::debug!("refused: too many handlers run detached from their requests");
    let problem = Problem::of(ProblemKind::TooManyDetached).with_retry_after(STORE_RETRY_AFTER);
    runtime.problem_response(&problem)
}

/// `500`: the handler panicked.
pub(super) fn handler_panicked(runtime: &Idempotency) -> Response {
    runtime.problem_response(&Problem::of(ProblemKind::HandlerPanicked))
}

/// Marks a response produced without idempotency (fail-open).
pub(super) fn unprotected(mut response: Response) -> Response {
    response.headers_mut().insert(
        IDEMPOTENT_UNPROTECTED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

/// A handler's response, read for recording.
pub(super) enum Captured {
    /// What to record, and the response to send (whole, or streaming on past the limit).
    Recordable(Arc<RecordedResult>, Response),
    /// The body failed while being read: nothing to record; the response yields what was read and
    /// then the error.
    Failed(Response),
}

/// Reads `response` for recording as the lease's route says: the body up to the runtime's limit (a
/// larger one is recorded as not replayable and still streams whole to the client), or status and
/// headers only (`store_body = false`). The request's id, if any, is recorded to be replayed as
/// `Original-Request`.
pub(super) async fn capture(lease: &Lease, response: Response) -> Captured {
    let (runtime, route) = (&lease.runtime, &lease.route);
    let (parts, body) = response.into_parts();
    let mut headers = StoredResponse::filter_headers(&parts.headers, runtime.replayed_headers());
    if let Some(id) = &lease.request_id {
        headers.push((ORIGINAL_REQUEST.clone(), id.clone()));
    }
    let (result, body) = if route.store_body {
        match buffer(body, runtime.max_response_bytes()).await {
            Buffered::Whole(bytes) => {
                let stored = StoredResponse {
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                };
                (RecordedResult::Response(stored), Body::from(bytes))
            }
            Buffered::TooLarge(body) => {
                tracing::warn!(
                    limit = runtime.max_response_bytes(),
                    "response larger than max_response_bytes: recorded as not replayable"
                );
                (RecordedResult::TooLarge, body)
            }
            Buffered::Failed(body) => return Captured::Failed(Response::from_parts(parts, body)),
        }
    } else {
        headers.retain(|(name, _)| !is_body_header(name));
        let stored = StoredResponse {
            status: parts.status,
            headers,
            body: Bytes::new(),
        };
        (RecordedResult::Response(stored), body)
    };
    Captured::Recordable(Arc::new(result), Response::from_parts(parts, body))
}

/// Headers that describe a body: not replayed with an empty one.
fn is_body_header(name: &HeaderName) -> bool {
    [
        http::header::CONTENT_TYPE,
        http::header::CONTENT_ENCODING,
        http::header::CONTENT_LANGUAGE,
    ]
    .contains(name)
}

enum Buffered {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Over the limit: a body that yields everything read so far and then the rest.
    TooLarge(Body),
    /// The body failed: a body that yields what was read and then the error.
    Failed(Body),
}

/// Reads `body` up to `limit` bytes without losing anything past it.
async fn buffer(mut body: Body, limit: usize) -> Buffered {
    if http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|upper| upper <= limit as u64)
    {
        return match body.collect().await {
            Ok(collected) => Buffered::Whole(collected.to_bytes()),
            Err(error) => Buffered::Failed(failed(Bytes::new(), error)),
        };
    }
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Whole(read.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        return Buffered::TooLarge(prepend(read.freeze(), body));
                    }
                }
            }
            Some(Err(error)) => return Buffered::Failed(failed(read.freeze(), error)),
        }
    }
}

/// A body that yields `read` (if anything was) and then `error`.
fn failed(read: Bytes, error: axum::Error) -> Body {
    let mut frames = Vec::with_capacity(2);
    if !read.is_empty() {
        frames.push(Ok(read));
    }
    frames.push(Err(error));
    Body::from_stream(futures_util::stream::iter(frames))
}

/// A body that yields `head` and then the rest of `rest`.
fn prepend(head: Bytes, rest: Body) -> Body {
    use futures_util::StreamExt as _;
    let head = futures_util::stream::once(std::future::ready(Ok::<_, axum::Error>(head)));
    Body::from_stream(head.chain(rest.into_data_stream()))
}
