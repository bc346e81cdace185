//! Attaching to an exec without bollard's framing guess.
//!
//! bollard decides per chunk whether output is raw TTY data or multiplexed frames by looking
//! at the first byte, which breaks TTY output that starts with 0x00-0x02.
//! Here the `/exec/{id}/start` upgrade is done directly: with a TTY the stream is raw bytes;
//! without one it is Docker's multiplexed framing (8-byte header: stream, 0, 0, 0, length as
//! big-endian u32), decoded below where the mode is known rather than guessed.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio_util::io::ReaderStream;

use crate::{Output, OutputStream, RuntimeError};

pub(crate) type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// POSTs `/v{api}/exec/{id}/start` on the engine's socket and returns the hijacked stream.
pub(crate) async fn start_attached(
    socket: &Path,
    api_version: &str,
    exec_id: &str,
    tty: bool,
) -> Result<Upgraded, RuntimeError> {
    let unavailable = |e: std::io::Error| RuntimeError::Unavailable(e.to_string());
    let io = TokioIo::new(UnixStream::connect(socket).await.map_err(unavailable)?);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| RuntimeError::Docker(format!("exec attach handshake: {e}")))?;
    tokio::spawn(conn.with_upgrades());
    let body = serde_json::json!({ "Detach": false, "Tty": tty }).to_string();
    let req = Request::post(format!("/v{api_version}/exec/{exec_id}/start"))
        .header("host", "docker")
        .header("content-type", "application/json")
        .header("connection", "Upgrade")
        .header("upgrade", "tcp")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| RuntimeError::Docker(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| RuntimeError::Docker(format!("exec start: {e}")))?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(RuntimeError::Docker(format!(
            "exec start: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| RuntimeError::Docker(format!("exec upgrade: {e}")))?;
    Ok(TokioIo::new(upgraded))
}

/// Raw TTY output: every byte is stdout.
pub(crate) fn raw_output<R: AsyncRead + Send + 'static>(reader: R) -> OutputStream {
    Box::pin(ReaderStream::with_capacity(reader, 32 * 1024).map(|r| {
        r.map(Output::Stdout)
            .map_err(|e| RuntimeError::Docker(format!("exec output: {e}")))
    }))
}

/// Multiplexed output of a non-TTY exec.
pub(crate) fn demux_output<R: AsyncRead + Send + Unpin + 'static>(reader: R) -> OutputStream {
    Box::pin(stream::unfold(reader, |mut r| async move {
        match read_frame(&mut r).await {
            Ok(Some(out)) => Some((Ok(out), r)),
            Ok(None) => None,
            Err(e) => Some((Err(RuntimeError::Docker(format!("exec output: {e}"))), r)),
        }
    }))
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Output>> {
    loop {
        let mut header = [0u8; 8];
        // A clean end of stream only counts at a frame boundary.
        let first = r.read(&mut header[..1]).await?;
        if first == 0 {
            return Ok(None);
        }
        r.read_exact(&mut header[1..]).await?;
        let [kind, _, _, _, a, b, c, d] = header;
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        let mut payload = BytesMut::zeroed(len);
        r.read_exact(&mut payload).await?;
        match kind {
            1 => return Ok(Some(Output::Stdout(payload.freeze()))),
            2 => return Ok(Some(Output::Stderr(payload.freeze()))),
            // 0 is stdin (never sent back); anything else is skipped rather than trusted.
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0, 0, 0];
        v.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[tokio::test]
    async fn demuxes_frames_and_keeps_streams_apart() {
        let mut input = frame(1, b"out\x00\x01");
        input.extend(frame(2, b"err"));
        input.extend(frame(1, b""));
        let outs: Vec<_> = demux_output(std::io::Cursor::new(input))
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(
            outs,
            vec![
                Output::Stdout(Bytes::from_static(b"out\x00\x01")),
                Output::Stderr(Bytes::from_static(b"err")),
                Output::Stdout(Bytes::new()),
            ]
        );
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut input = frame(1, b"hello");
        input.truncate(10);
        let outs: Vec<_> = demux_output(std::io::Cursor::new(input)).collect().await;
        assert_eq!(outs.len(), 1);
        assert!(outs[0].is_err());
    }

    #[tokio::test]
    async fn raw_output_keeps_low_bytes() {
        let outs: Vec<_> = raw_output(std::io::Cursor::new(b"\x00\x01\x02abc".to_vec()))
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(
            outs,
            vec![Output::Stdout(Bytes::from_static(b"\x00\x01\x02abc"))]
        );
    }
}
