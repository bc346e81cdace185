//! A session's process: the command line it runs in the container (login shell, command,
//! sftp-server, with the X11 cookie set up), the text "process" of a host word, and the
//! control that resizes it, waits for it and ends it when the client goes.

use std::sync::Arc;

use berth_runtime::{Output as RtOutput, Runtime, Session, SessionHandle, SessionSpec, TtySize};
use berth_ssh::{Command, OpenError, OpenRequest, Output, Process, ProcessControl, WindowSize};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tracing::{error, warn};

use super::words::WordOutput;
use super::{BerthGateway, HostWord};
use crate::lifecycle::{Lease, LifecycleError};
use crate::sessions::{Registration, SharedGuard};

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

/// Puts the session's X11 cookie where X clients look for it, as sshd does with xauth,
/// when the image has xauth.
const X11_PRELUDE: &str = r#"if [ -n "$BERTH_X11_COOKIE" ] && command -v xauth >/dev/null 2>&1; then
  xauth -q add "unix:$BERTH_X11_DISPLAY" "$BERTH_X11_PROTO" "$BERTH_X11_COOKIE" 2>/dev/null
fi
unset BERTH_X11_PROTO BERTH_X11_COOKIE BERTH_X11_DISPLAY"#;

/// Runs the image's own sftp-server (its path differs by distribution), or Berth's own
/// when the image has none (busybox), as root in the user's home like sshd does.
const SFTP_SERVER: &str = r#"cd "${HOME:-/root}" 2>/dev/null
for p in /usr/lib/openssh/sftp-server /usr/lib/ssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server /usr/lib/sftp-server; do
  if [ -x "$p" ]; then exec "$p"; fi
done
exec /.berth/berth-guest sftp-server"#;

/// How long the removal of a session's X11 cookie may run (the image's `xauth` is the
/// user's to replace).
const X11_CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl<R: Runtime> BerthGateway<R> {
    pub(super) async fn open_session(&self, req: OpenRequest) -> Result<Process, OpenError> {
        // The connection authenticated earlier; the key or the user may be gone since.
        let user = self.authorized_user(&req.user, &req.key).await?;
        if let Command::Exec(cmd) = &req.command
            && let Some(word) = HostWord::parse(cmd)
        {
            let out = self.host_word(&user, word).await;
            return Ok(text_process(out, req.pty.is_some()));
        }
        if matches!(req.command, Command::Connect) {
            return self.open_connect(&user, &req).await;
        }
        let lease = self.lease(&user).await?;
        let display = match &req.x11 {
            Some(x) => Some(self.x11_display(&user, lease.container(), x).await?),
            None => None,
        };
        let spec = self.session_spec(&req, display.as_ref().map(|(n, _)| *n));
        let mut session = self
            .runtime
            .start_session(lease.container(), spec)
            .await
            .map_err(|e| {
                error!(user = %user, error = %e, "login failed: the session did not start");
                OpenError(LifecycleError::Runtime(e).for_user())
            })?;
        let x11_display = display.as_ref().map(|(n, _)| *n);
        let command = match &req.command {
            Command::Shell => "shell".to_owned(),
            Command::Sftp => "sftp".to_owned(),
            Command::Connect => "berth connect".to_owned(),
            Command::Exec(c) => c.chars().take(200).collect(),
        };
        let guard = Arc::new(std::sync::Mutex::new(std::mem::take(&mut session.guard)));
        let registration = self
            .sessions
            .register(user.as_str(), req.peer, command, &guard);
        let mut process = into_process(
            self.runtime.clone(),
            session,
            guard,
            registration,
            lease,
            x11_display,
        );
        process.x11 = display.map(|(_, l)| l);
        Ok(process)
    }

    fn session_spec(&self, req: &OpenRequest, display: Option<u16>) -> SessionSpec {
        let with_x11 = |script: &str| match display {
            Some(_) => format!("{X11_PRELUDE}\n{script}"),
            None => script.to_owned(),
        };
        let cmd = match &req.command {
            Command::Shell => vec!["/bin/sh".into(), "-c".into(), with_x11(LOGIN_SHELL)],
            Command::Exec(c) if display.is_some() => vec![
                "/bin/sh".into(),
                "-c".into(),
                with_x11("exec /bin/sh -c \"$1\""),
                "sh".into(),
                c.clone(),
            ],
            Command::Exec(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
            Command::Sftp => vec!["/bin/sh".into(), "-c".into(), SFTP_SERVER.into()],
            // Served by the daemon (`open_connect`); never a process.
            Command::Connect => vec!["/bin/false".into()],
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
        if let (Some(n), Some(x)) = (display, &req.x11) {
            env.push(format!("DISPLAY=localhost:{n}.{}", x.screen));
            env.push(format!("BERTH_X11_DISPLAY={n}"));
            env.push(format!("BERTH_X11_PROTO={}", x.auth_protocol));
            env.push(format!("BERTH_X11_COOKIE={}", x.auth_cookie));
        }
        SessionSpec {
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

/// A finished "process" made of fixed text, for host words.
fn text_process(out: WordOutput, tty: bool) -> Process {
    let fix = |s: String| if tty { s.replace('\n', "\r\n") } else { s };
    let chunks: Vec<std::io::Result<Output>> = [
        Output::Stdout(bytes::Bytes::from(fix(out.stdout))),
        Output::Stderr(bytes::Bytes::from(fix(out.stderr))),
    ]
    .into_iter()
    .filter(|o| !matches!(o, Output::Stdout(b) | Output::Stderr(b) if b.is_empty()))
    .map(Ok)
    .collect();
    Process {
        x11: None,
        stdin: Box::pin(tokio::io::sink()),
        stdin_now: None,
        output_now: None,
        output: Box::pin(futures_util::stream::iter(chunks)),
        control: Box::new(Exited(out.code)),
    }
}

struct Exited(u32);

impl ProcessControl for Exited {
    fn resize(&self, _size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn wait(&mut self) -> BoxFuture<'_, u32> {
        let code = self.0;
        Box::pin(async move { code })
    }
}

fn into_process<R: Runtime>(
    runtime: Arc<R>,
    session: Session,
    guard: SharedGuard,
    registration: Registration,
    lease: Lease,
    x11_display: Option<u16>,
) -> Process {
    let Session {
        handle,
        stdin,
        stdin_now,
        output_now,
        output,
        ..
    } = session;
    let output = output.map(|r| {
        r.map(|o| match o {
            RtOutput::Stdout(b) => Output::Stdout(b),
            RtOutput::Stderr(b) => Output::Stderr(b),
        })
        .map_err(std::io::Error::other)
    });
    Process {
        x11: None,
        stdin,
        stdin_now,
        output_now,
        output: Box::pin(output),
        control: Box::new(SessionControl {
            runtime,
            handle,
            guard,
            registration,
            x11_display,
            _lease: lease,
        }),
    }
}

/// Ties a session's process to its SSH session: dropping it (the client left) kills what
/// still runs of the process tree and gives the lease back.
struct SessionControl<R: Runtime> {
    runtime: Arc<R>,
    handle: SessionHandle,
    /// Killed on drop unless finished; shared with the session registry (`session kill`).
    guard: SharedGuard,
    registration: Registration,
    /// The session's X11 display, whose cookie is removed when the session ends.
    x11_display: Option<u16>,
    _lease: Lease,
}

impl<R: Runtime> Drop for SessionControl<R> {
    fn drop(&mut self) {
        let Some(n) = self.x11_display else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let runtime = self.runtime.clone();
        let container = self._lease.container().to_owned();
        rt.spawn(async move {
            let spec = SessionSpec {
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("command -v xauth >/dev/null 2>&1 && xauth -q remove unix:{n}"),
                ],
                env: vec!["HOME=/root".into()],
                tty: None,
            };
            let cleanup = async {
                if let Ok(mut session) = runtime.start_session(&container, spec).await {
                    while session.output.next().await.is_some() {}
                    session.guard.finished();
                }
            };
            // Past the deadline the session is dropped, which kills what is left of it.
            if tokio::time::timeout(X11_CLEANUP_TIMEOUT, cleanup)
                .await
                .is_err()
            {
                warn!(container, "X11 cookie removal did not finish in time");
            }
        });
    }
}

impl<R: Runtime> ProcessControl for SessionControl<R> {
    fn resize(&self, size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.runtime.resize_session(&self.handle, tty(size)).await {
                warn!(container = self._lease.container(), error = %e, "resize failed");
            }
        })
    }

    fn wait(&mut self) -> BoxFuture<'_, u32> {
        Box::pin(async move {
            match self.runtime.session_exit_code(&self.handle).await {
                Ok(code) => {
                    if let Ok(mut g) = self.guard.lock() {
                        g.finished();
                    }
                    let code = u32::try_from(code).unwrap_or(255);
                    self.registration.set_exit(code);
                    code
                }
                Err(e) => {
                    warn!(container = self._lease.container(), error = %e, "no exit code");
                    255
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn text_process_uses_crlf_on_a_tty() {
        let out = WordOutput {
            stdout: "a\nb\n".into(),
            stderr: String::new(),
            code: 0,
        };
        let p = text_process(out, true);
        let chunks: Vec<_> = p.output.collect::<Vec<_>>().await;
        assert_eq!(chunks.len(), 1);
        assert!(matches!(&chunks[0], Ok(Output::Stdout(b)) if b.as_ref() == b"a\r\nb\r\n"));
    }
}
