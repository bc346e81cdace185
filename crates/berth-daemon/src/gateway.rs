//! Berth's answer to the SSH gateway's two questions: may this key log in as this user, and
//! run this session in the user's container.

use std::sync::Arc;

use berth_proto::{PublicKey, UserName, fingerprint};
use berth_runtime::{Exec, ExecSpec, Output as RtOutput, Runtime, RuntimeError, TtySize};
use berth_ssh::{
    Command, Gateway, OpenError, OpenRequest, Output, Process, ProcessControl, WindowSize,
};
use berth_store::Store;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tracing::{error, warn};

use crate::blocking;
use crate::lifecycle::{Lease, Lifecycle, LifecycleError};

/// Starts a login shell for root: the shell and home named in the image's `/etc/passwd`
/// (`/bin/sh` and `/root` when absent), run with `-l` like sshd does. Written for any POSIX
/// `sh`, busybox's included.
const LOGIN_SHELL: &str = r#"s=/bin/sh h=/root
if [ -r /etc/passwd ]; then
  while IFS=: read -r n _ _ _ _ d sh; do
    if [ "$n" = root ]; then
      if [ -n "$sh" ] && [ -x "$sh" ]; then s=$sh; fi
      if [ -n "$d" ]; then h=$d; fi
      break
    fi
  done < /etc/passwd
fi
cd "$h" 2>/dev/null || cd /
export HOME="$h" SHELL="$s"
exec "$s" -l"#;

pub struct BerthGateway<R> {
    pub store: Store,
    pub runtime: Arc<R>,
    pub lifecycle: Arc<Lifecycle<R>>,
    pub port: u16,
}

impl<R: Runtime> Gateway for BerthGateway<R> {
    async fn authorize(&self, user: &str, key: &PublicKey) -> bool {
        if UserName::parse(user).is_err() {
            return false;
        }
        let store = self.store.clone();
        let (user, fp) = (user.to_owned(), fingerprint(key));
        match blocking(move || store.key_authorized(&user, &fp)).await {
            Ok(ok) => ok,
            Err(e) => {
                error!(error = %e, "key lookup failed");
                false
            }
        }
    }

    async fn open(&self, req: OpenRequest) -> Result<Process, OpenError> {
        let user = UserName::parse(&req.user).map_err(|_| OpenError("unknown user".into()))?;
        // The connection authenticated earlier; the key or the user may be gone since.
        if !self.authorize(&req.user, &req.key).await {
            return Err(OpenError("access revoked".into()));
        }
        let lease = self.lifecycle.acquire(&user).await.map_err(|e| {
            error!(user = %user, error = %e, "login failed: no running container");
            OpenError(login_error(&e))
        })?;
        let spec = self.exec_spec(&req);
        let exec = self
            .runtime
            .exec(lease.container(), spec)
            .await
            .map_err(|e| {
                error!(user = %user, error = %e, "login failed: exec");
                OpenError(login_error(&LifecycleError::Runtime(e)))
            })?;
        Ok(into_process(self.runtime.clone(), exec, lease))
    }
}

impl<R: Runtime> BerthGateway<R> {
    fn exec_spec(&self, req: &OpenRequest) -> ExecSpec {
        let cmd = match &req.command {
            Command::Shell => vec!["/bin/sh".into(), "-c".into(), LOGIN_SHELL.into()],
            Command::Exec(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
        };
        let mut env = vec![
            "USER=root".to_owned(),
            "LOGNAME=root".to_owned(),
            "HOME=/root".to_owned(),
        ];
        env.push(format!("SSH_PORT={}", self.port));
        if let Some(peer) = req.peer {
            env.push(format!(
                "SSH_CLIENT={} {} {}",
                peer.ip(),
                peer.port(),
                self.port
            ));
        }
        if let Some(pty) = &req.pty {
            env.push(format!("TERM={}", pty.term));
        }
        env.extend(req.env.iter().map(|(k, v)| format!("{k}={v}")));
        ExecSpec {
            cmd,
            env,
            tty: req.pty.as_ref().map(|p| tty(p.size)),
        }
    }
}

fn tty(size: WindowSize) -> TtySize {
    TtySize {
        cols: size.cols,
        rows: size.rows,
    }
}

/// The one line a user sees when their session cannot start. Details stay in the log.
fn login_error(e: &LifecycleError) -> String {
    match e {
        LifecycleError::Runtime(RuntimeError::Unavailable(_)) => {
            "the container engine is not available right now; try again later".into()
        }
        LifecycleError::Runtime(RuntimeError::ImageNotFound(_)) => {
            "your container's image is missing on this server; ask the administrator".into()
        }
        LifecycleError::Runtime(_) | LifecycleError::Store(_) | LifecycleError::Foreign(_) => {
            "your container could not be started; ask the administrator (details are in the berth log)".into()
        }
        LifecycleError::ShuttingDown => "the server is shutting down; try again later".into(),
    }
}

fn into_process<R: Runtime>(runtime: Arc<R>, exec: Exec, lease: Lease) -> Process {
    let Exec {
        id,
        stdin,
        output,
        guard,
    } = exec;
    let output = output.map(|r| {
        r.map(|o| match o {
            RtOutput::Stdout(b) => Output::Stdout(b),
            RtOutput::Stderr(b) => Output::Stderr(b),
        })
        .map_err(std::io::Error::other)
    });
    Process {
        stdin,
        output: Box::pin(output),
        control: Box::new(ExecControl {
            runtime,
            id,
            guard,
            _lease: lease,
        }),
    }
}

/// Ties an exec to its session: dropping it (the client left) kills what still runs of the
/// exec and gives the lease back.
struct ExecControl<R> {
    runtime: Arc<R>,
    id: String,
    guard: berth_runtime::ProcessGuard,
    _lease: Lease,
}

impl<R: Runtime> ProcessControl for ExecControl<R> {
    fn resize(&self, size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.runtime.resize_exec(&self.id, tty(size)).await {
                warn!(error = %e, "resize failed");
            }
        })
    }

    fn wait(&mut self) -> BoxFuture<'_, u32> {
        Box::pin(async move {
            match self.runtime.exec_exit_code(&self.id).await {
                Ok(code) => {
                    self.guard.finished();
                    u32::try_from(code).unwrap_or(255)
                }
                Err(e) => {
                    warn!(error = %e, "no exit code");
                    255
                }
            }
        })
    }
}
