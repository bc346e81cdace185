//! The words socket server: one unix socket per user's container, at
//! `STATE/run/USER/guest.sock` on the host, mounted read-only at `/.berth/run` in that
//! container only (the protocol: [`berth_guest_proto::words`]).
//!
//! Which user a request is for comes from which socket it arrived on, never from what was
//! sent: a container can only ever act on itself. Input is bounded (one short line, a few
//! seconds, a few connections at a time) and anything else gets an error line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_guest_proto::fds::{GuardedUnixListener, GuardedUnixStream};
use berth_guest_proto::words::{Answer, MAX_LINE, SOCKET_FILE, Word};
use berth_proto::UserName;
use berth_runtime::Runtime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::warn;

use crate::lifecycle::Lifecycle;

const MAX_CONNECTIONS: usize = 4;

/// Makes `dir` and binds a fresh socket in it (descriptors refused, see
/// [`berth_guest_proto::fds`]).
pub fn bind(dir: &Path) -> std::io::Result<GuardedUnixListener> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join(SOCKET_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = GuardedUnixListener::new(UnixListener::bind(&path)?);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves one user's socket. Connection tasks live in a `JoinSet` owned by this future, so
/// when the owner drops it (user removed, shutdown) nothing of it keeps acting for that user.
pub async fn serve<R: Runtime>(
    listener: GuardedUnixListener,
    lc: Arc<Lifecycle<R>>,
    user: UserName,
) {
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
            Ok(s) => s,
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
            if req == Some(Word::StopNow) {
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
    stream: GuardedUnixStream,
    lc: &Arc<Lifecycle<R>>,
    user: &UserName,
    stopping: &AtomicBool,
) -> Option<Word> {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let request = match read {
        Ok(Ok(_)) if line.ends_with('\n') => Word::parse_line(&line),
        _ => None,
    };
    let (answer, done) = match request {
        None => (
            Answer::Error("unknown request; expected daemon, nodaemon or stopnow".to_owned()),
            None,
        ),
        Some(Word::StopNow) if stopping.swap(true, Ordering::SeqCst) => (
            Answer::Ok("your container is already stopping".to_owned()),
            None,
        ),
        Some(req) => (answer(req, lc, user).await, Some(req)),
    };
    let _ = write.write_all(answer.line().as_bytes()).await;
    let _ = write.shutdown().await;
    done
}

async fn answer<R: Runtime>(req: Word, lc: &Arc<Lifecycle<R>>, user: &UserName) -> Answer {
    let result = match req {
        Word::Daemon => lc.set_daemon_mode(user, true).await.map(|()| {
            "daemon mode on: your container keeps running when no session is open".to_owned()
        }),
        Word::NoDaemon => lc.set_daemon_mode(user, false).await.map(|()| {
            format!(
                "daemon mode off: your container stops {} s after your last session ends",
                lc.idle_stop().as_secs()
            )
        }),
        Word::StopNow => Ok("stopping your container; every session in it ends".to_owned()),
    };
    match result {
        Ok(text) => Answer::Ok(text),
        Err(e) => {
            warn!(error = %e, "guest request failed");
            Answer::Error("the request failed; details are in the berth log".to_owned())
        }
    }
}
