//! The admin client: HTTP/1.1 over the daemon's unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the berth daemon is not running (no answer on {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("permission denied on {}: the admin socket is for root", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{}", .0.error)]
    Api(ApiError),
    #[error("admin socket protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::NotRunning { .. } => Some(
                "start it with `berth daemon` (or check --state-dir / BERTH_STATE_DIR)".to_owned(),
            ),
            Self::PermissionDenied { .. } => Some("run the command as root".to_owned()),
            Self::Api(e) => e.hint.clone(),
            Self::Protocol(_) => None,
        }
    }
}

/// A client bound to one admin socket path. Each call opens a fresh connection; the CLI
/// makes one or two calls per run, so pooling would buy nothing.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// POSTs a raw byte stream (an image's root file system tar) as the request body.
    pub async fn post_stream<S, T>(&self, path: &str, body: S) -> Result<T, ClientError>
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
        T: DeserializeOwned,
    {
        use futures_util::TryStreamExt;
        let body = http_body_util::StreamBody::new(body.map_ok(hyper::body::Frame::data));
        self.send(Method::POST, path, "application/x-tar", body)
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        self.send(
            method,
            path,
            "application/json",
            Full::new(Bytes::from(bytes)),
        )
        .await
    }

    /// GETs `path` and writes the reply's body to `out` as it comes (a user's archive),
    /// calling `progress` with the bytes written so far and the whole length when known;
    /// returns the bytes written.
    pub async fn download<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let resp = self
            .open(
                Method::GET,
                path,
                "application/json",
                Full::new(Bytes::new()),
            )
            .await?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(Self::error(status, resp).await);
        }
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut body = resp.into_body();
        let mut n = 0_u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)
                    .await
                    .map_err(|e| ClientError::Protocol(format!("writing: {e}")))?;
                n += u64::try_from(data.len()).unwrap_or(0);
                progress(n, len);
            }
        }
        out.flush()
            .await
            .map_err(|e| ClientError::Protocol(format!("writing: {e}")))?;
        if len.is_some_and(|l| l != n) {
            return Err(ClientError::Protocol(format!(
                "the daemon sent {n} of {} bytes",
                len.unwrap_or(0)
            )));
        }
        Ok(n)
    }

    async fn error(
        status: StatusCode,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> ClientError {
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return ClientError::Protocol(e.to_string()),
        };
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Protocol(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            )),
        }
    }

    async fn send<Bd, T>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bd,
    ) -> Result<T, ClientError>
    where
        Bd: hyper::body::Body<Data = Bytes> + Send + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T: DeserializeOwned,
    {
        let resp = self.open(method, path, content_type, body).await?;
        let status = resp.status();
        if status != StatusCode::OK && status != StatusCode::CREATED {
            return Err(Self::error(status, resp).await);
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn open<Bd>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bd,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        Bd: hyper::body::Body<Data = Bytes> + Send + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    path: self.socket.clone(),
                }
            } else {
                ClientError::NotRunning {
                    path: self.socket.clone(),
                }
            }
        })?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(format!("/v1{path}"))
            .header("host", "berth")
            .header("content-type", content_type)
            .body(body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tx.send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
