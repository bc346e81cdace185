//! The guest socket server: one unix socket per user's container, at
//! `STATE/run/USER/guest.sock` on the host, mounted read-only at `/.berth/run` in that
//! container only. `berth-guest` (as `daemon`, `nodaemon`, `stopnow`) writes one word and a
//! newline; the daemon answers one line, `ok TEXT` or `error TEXT`.
//!
//! Which user a request is for comes from which socket it arrived on, never from what was
//! sent: a container can only ever act on itself. Input is bounded (one short line, a few
//! seconds, a few connections at a time) and anything else gets an error line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_proto::UserName;
use berth_runtime::Runtime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::warn;

use crate::lifecycle::Lifecycle;

pub const SOCKET_NAME: &str = "guest.sock";
const MAX_LINE: u64 = 64;
const MAX_CONNECTIONS: usize = 4;

/// What a container may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    Daemon,
    NoDaemon,
    StopNow,
}

impl GuestRequest {
    pub fn parse(line: &str) -> Option<Self> {
        match line.trim_end_matches(['\n', '\r']) {
            "daemon" => Some(Self::Daemon),
            "nodaemon" => Some(Self::NoDaemon),
            "stopnow" => Some(Self::StopNow),
            _ => None,
        }
    }
}

/// Makes `dir` and binds a fresh socket in it.
pub fn bind(dir: &Path) -> std::io::Result<UnixListener> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join(SOCKET_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves one user's socket. Connection tasks live in a `JoinSet` owned by this future, so
/// when the owner drops it (user removed, shutdown) nothing of it keeps acting for that user.
pub async fn serve<R: Runtime>(listener: UnixListener, lc: Arc<Lifecycle<R>>, user: UserName) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stopping = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    loop {
        // Wait for a free slot before taking the next connection: a container that keeps
        // connecting just waits in the listen backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "guest socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let lc = lc.clone();
        let user = user.clone();
        let stopping = stopping.clone();
        tasks.spawn(async move {
            let req = handle(stream, &lc, &user, &stopping).await;
            if req == Some(GuestRequest::StopNow) {
                // Answered first: the stop ends the very process that asked.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Err(e) = lc.stop(&user).await {
                    warn!(error = %e, "stopnow failed");
                }
                stopping.store(false, Ordering::SeqCst);
            }
            // A container cannot drive the daemon faster than this: each connection holds
            // one of a few permits a little while after its answer.
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(permit);
        });
    }
}

/// Answers one connection; returns the request it carried out.
async fn handle<R: Runtime>(
    stream: UnixStream,
    lc: &Arc<Lifecycle<R>>,
    user: &UserName,
    stopping: &AtomicBool,
) -> Option<GuestRequest> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let request = match read {
        Ok(Ok(_)) if line.ends_with('\n') => GuestRequest::parse(&line),
        _ => None,
    };
    let (answer, done) = match request {
        None => (
            "error unknown request; expected daemon, nodaemon or stopnow".to_owned(),
            None,
        ),
        Some(GuestRequest::StopNow) if stopping.swap(true, Ordering::SeqCst) => {
            ("ok your container is already stopping".to_owned(), None)
        }
        Some(req) => (answer(req, lc, user).await, Some(req)),
    };
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
    let _ = write.shutdown().await;
    done
}

async fn answer<R: Runtime>(req: GuestRequest, lc: &Arc<Lifecycle<R>>, user: &UserName) -> String {
    let result = match req {
        GuestRequest::Daemon => lc.set_daemon_mode(user, true).await.map(|()| {
            "daemon mode on: your container keeps running when no session is open".to_owned()
        }),
        GuestRequest::NoDaemon => lc.set_daemon_mode(user, false).await.map(|()| {
            format!(
                "daemon mode off: your container stops {} s after your last session ends",
                lc.idle_stop().as_secs()
            )
        }),
        GuestRequest::StopNow => Ok("stopping your container; every session in it ends".to_owned()),
    };
    match result {
        Ok(text) => format!("ok {text}"),
        Err(e) => {
            warn!(error = %e, "guest request failed");
            "error the request failed; details are in the berth log".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_three_words() {
        assert_eq!(GuestRequest::parse("daemon\n"), Some(GuestRequest::Daemon));
        assert_eq!(
            GuestRequest::parse("nodaemon\r\n"),
            Some(GuestRequest::NoDaemon)
        );
        assert_eq!(
            GuestRequest::parse("stopnow\n"),
            Some(GuestRequest::StopNow)
        );
        for bad in [
            "",
            "\n",
            "daemon alice\n",
            "DAEMON\n",
            "stop\n",
            "daemon\0\n",
            "\u{feff}daemon\n",
        ] {
            assert_eq!(GuestRequest::parse(bad), None, "{bad:?}");
        }
    }
}
