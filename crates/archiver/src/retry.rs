//! Retrying with exponential backoff, cancellable.

use std::future::Future;
use std::time::Duration;

use etcdpitr_common::errors;
use tokio_util::sync::CancellationToken;

/// First delay between attempts.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest delay between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Retries `f` with backoff until it succeeds, fails for good (per
/// `retryable`), or shutdown is requested (`Ok(None)`).
pub async fn retry<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    retryable: impl Fn(&anyhow::Error) -> bool,
    mut f: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut delay = RETRY_MIN;
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            r = f() => r,
        };
        match outcome {
            Ok(v) => return Ok(Some(v)),
            Err(e) if retryable(&e) => {
                tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?delay, "{what} failed; retrying");
                if !pause(&mut delay, shutdown).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.context(what.to_owned())),
        }
    }
}

/// Sleeps for `delay`, then doubles it (up to [`RETRY_MAX`]) for the next
/// time. Returns `false` if shutdown came first.
pub async fn pause(delay: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => return false,
        () = tokio::time::sleep(*delay) => {}
    }
    *delay = (*delay * 2).min(RETRY_MAX);
    true
}
