//! Registry errors in a gRPC status, the same way for every service: code ABORTED, the detail
//! as message, the OCI error code and the HTTP status as metadata, so that a client reads back
//! exactly the error the server's store returned.

use berth_core::{ErrorCode, RegistryError};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};

/// Metadata entry naming the OCI error code of a registry error (`BLOB_UNKNOWN`).
pub const ERROR_CODE: &str = "x-berth-error-code";

/// Metadata entry carrying the HTTP status of a registry error (`404`).
pub const ERROR_STATUS: &str = "x-berth-error-status";

/// A registry error as a status.
pub fn status_of(e: RegistryError) -> Status {
    let mut md = MetadataMap::new();
    // Every code is upper-case ASCII and underscores, a valid metadata value.
    md.insert(ERROR_CODE, AsciiMetadataValue::from_static(e.code.as_str()));
    md.insert(ERROR_STATUS, AsciiMetadataValue::from(e.status));
    Status::with_metadata(Code::Aborted, e.detail, md)
}

/// The registry error a status carries, if it is one [`status_of`] made.
pub fn registry_error_of(status: &Status) -> Option<RegistryError> {
    if status.code() != Code::Aborted {
        return None;
    }
    let md = status.metadata();
    let code = ErrorCode::from_name(md.get(ERROR_CODE)?.to_str().ok()?)?;
    let http = md.get(ERROR_STATUS)?.to_str().ok()?.parse().ok()?;
    Some(RegistryError::new(code, status.message()).with_status(http))
}

/// A registry error as the three fields a message carries it in where one call answers several
/// requests and a status could carry only one: its code's name, its HTTP status, its detail.
pub fn error_fields(e: RegistryError) -> (String, u32, String) {
    (e.code.as_str().to_string(), e.status.into(), e.detail)
}

/// The registry error [`error_fields`] made; a code this side does not know reads as
/// `UNKNOWN`, a status out of range as 500.
pub fn error_from_fields(code: &str, status: u32, detail: String) -> RegistryError {
    RegistryError::new(ErrorCode::from_name(code).unwrap_or(ErrorCode::Unknown), detail)
        .with_status(u16::try_from(status).unwrap_or(500))
}

/// Whether a failed call never reached its peer's service: a connection error (refused,
/// unreachable, a name that does not resolve, a connect timeout), or an HTTP/2 stream the peer
/// refused unprocessed (REFUSED_STREAM, as a server shutting down answers), or one it turned
/// away by going away without error (a GOAWAY with NO_ERROR fails only the streams it did not
/// process, and those opened after it), or a request the HTTP client dropped unsent when its
/// connection closed, anywhere in the status's cause chain. Repeating such a call is safe
/// whatever it asked.
pub fn never_sent(status: &Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        // A request hyper had queued on a connection that closed before it was written (a peer
        // shutting down): hyper answers it "canceled", unsent.
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
            // A stream's error is a GOAWAY only when the peer did not process it: streams it
            // did process and then lost with the connection end as a broken pipe.
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that serves one request and goes away (GOAWAY, NO_ERROR), as a role shutting
    /// down does: what a request on that connection gets from then on counts as never sent;
    /// a status without such a cause does not.
    #[tokio::test]
    async fn a_request_turned_away_by_a_server_going_away_was_never_sent() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let (go, gone) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(far).await.expect("server handshake");
            let (_req, mut respond) = conn.accept().await.expect("a request").expect("a stream");
            respond.send_response(http::Response::new(()), true).expect("answer");
            // Driven until the client has its answer (and sends nothing more), then gone.
            tokio::select! {
                _ = conn.accept() => {}
                _ = gone => {}
            }
            conn.abrupt_shutdown(h2::Reason::NO_ERROR);
            while conn.accept().await.is_some() {}
        });
        let (client, conn) = h2::client::handshake(near).await.expect("client handshake");
        tokio::spawn(conn);
        let (first, _) = client.clone().send_request(http::Request::new(()), true).expect("first request");
        first.await.expect("the first request is served");
        go.send(()).expect("the server waits");
        let mut turned_away = None;
        for _ in 0..200 {
            if let Err(e) = client.clone().ready().await {
                turned_away = Some(e);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let e = turned_away.expect("the server went away");
        assert!(e.is_go_away() && e.is_remote(), "{e:?}");
        assert!(never_sent(&Status::from_error(Box::new(e))));
        assert!(!never_sent(&Status::unavailable("a connection that broke mid-call")));
    }

    #[test]
    fn every_registry_error_round_trips_as_fields() {
        for code in ErrorCode::ALL {
            let e = RegistryError::new(code, "why").with_status(409);
            let (c, s, d) = error_fields(e.clone());
            assert_eq!(error_from_fields(&c, s, d), e);
        }
        assert_eq!(error_from_fields("NO_SUCH_CODE", 70_000, "x".into()).code, ErrorCode::Unknown);
    }

    #[test]
    fn every_registry_error_round_trips() {
        for code in ErrorCode::ALL {
            for e in [
                RegistryError::new(code, "détail with \"quotes\", newline\nand % signs"),
                RegistryError::new(code, "").with_status(503),
                RegistryError::new(code, "too big").with_status(413),
            ] {
                let status = status_of(e.clone());
                assert_eq!(status.code(), Code::Aborted);
                assert_eq!(registry_error_of(&status), Some(e));
            }
        }
        assert_eq!(registry_error_of(&Status::unavailable("down")), None);
        let mut md = MetadataMap::new();
        md.insert(ERROR_CODE, AsciiMetadataValue::from_static("NOT_A_CODE"));
        md.insert(ERROR_STATUS, AsciiMetadataValue::from(404u16));
        assert_eq!(registry_error_of(&Status::with_metadata(Code::Aborted, "x", md)), None);
    }
}
