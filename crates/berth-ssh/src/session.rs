//! One session channel, owned by one task from its first message to its close.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use crate::inbox::{Drained, InboxRx, InboxTx, Overrun};
use crate::quota::{Slot, Tenant};
use crate::tunnel::relayed;

use crate::{
    Command, Event, ForwardKind, Gateway, OpenRequest, Output, Permission, Process, Pty, PublicKey,
    WindowSize, X11Request,
};

pub(crate) struct Context<G> {
    pub gateway: Arc<G>,
    pub user: String,
    pub key: PublicKey,
    /// What the credential the connection logged in with allows.
    pub allowed: crate::Allowed,
    pub peer: Option<SocketAddr>,
    pub connected_at: std::time::Instant,
    pub login_measured: Arc<std::sync::atomic::AtomicBool>,
    pub accept_env: Arc<Vec<String>>,
    pub handle: russh::server::Handle,
    /// The user's quotas (input buffer, forwarded connections).
    pub tenant: Tenant,
    /// The session's inbox, from the connection's loop once it starts.
    pub input: tokio::sync::oneshot::Receiver<(InboxTx, InboxRx)>,
    /// This session's place among its user's sessions.
    pub _slot: Slot,
}

/// A session channel's setup requests are kept until its shell or command starts, which a
/// client may put off for as long as its connection lives, on each of its user's session
/// channels: so what is kept is bounded. A variable of more than [`MAX_ENV_VAR_BYTES`]
/// (name and value), one past [`MAX_ENV_VARS`] or past [`MAX_ENV_BYTES`] in all is refused,
/// as is a terminal type longer than [`MAX_TERM_BYTES`] and an X11 request whose protocol or
/// cookie is longer than the display would take.
pub(crate) const MAX_ENV_VARS: usize = 64;
pub(crate) const MAX_ENV_VAR_BYTES: usize = 16 * 1024;
pub(crate) const MAX_ENV_BYTES: usize = 64 * 1024;
pub(crate) const MAX_TERM_BYTES: usize = 256;
/// The longest X11 authentication protocol name and cookie a display is made for.
pub(crate) const MAX_X11_PROTOCOL: usize = 64;
pub(crate) const MAX_X11_COOKIE: usize = 256;

/// The environment a session channel has been given so far. The connection's loop (which
/// answers each request) and the session's task (which keeps what is granted) each hold one
/// and see the same requests in the same order, so they agree on every one.
#[derive(Debug, Default)]
pub(crate) struct EnvBudget {
    vars: usize,
    bytes: usize,
}

impl EnvBudget {
    /// Whether `name=value` is granted; a granted one is counted.
    pub(crate) fn admit(&mut self, accept: &[String], name: &str, value: &str) -> bool {
        let size = name.len() + value.len();
        let ok = env_allowed(accept, name)
            && size <= MAX_ENV_VAR_BYTES
            && self.vars < MAX_ENV_VARS
            && self.bytes + size <= MAX_ENV_BYTES;
        if ok {
            self.vars += 1;
            self.bytes += size;
        }
        ok
    }
}

/// Whether an X11 request's protocol and cookie are within what is kept.
pub(crate) fn x11_kept(protocol: &str, cookie: &str) -> bool {
    protocol.len() <= MAX_X11_PROTOCOL && cookie.len() <= MAX_X11_COOKIE
}

/// Whether a client environment variable passes the allow-list (`NAME` or `PREFIX*`).
pub(crate) fn env_allowed(accept: &[String], name: &str) -> bool {
    accept.iter().any(|pat| match pat.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pat == name,
    })
}

fn clamp(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

pub(crate) async fn run<G: Gateway>(ctx: Context<G>, channel: Channel<Msg>) {
    let (mut rx, tx) = channel.split();
    let mut pty = None;
    let mut env = Vec::new();
    let mut env_budget = EnvBudget::default();
    let mut agent = false;
    let mut x11 = None;
    let mut early_eof = false;
    // Setup: collect pty and env until the client asks for a shell or a command.
    let command = loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) if ctx.allowed.pty && term.len() <= MAX_TERM_BYTES => {
                pty = Some(Pty {
                    term,
                    size: WindowSize {
                        cols: clamp(col_width),
                        rows: clamp(row_height),
                    },
                });
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(p) = pty.as_mut() {
                    p.size = WindowSize {
                        cols: clamp(col_width),
                        rows: clamp(row_height),
                    };
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if env_budget.admit(&ctx.accept_env, &variable_name, &variable_value) {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::AgentForward { .. }) => agent = true,
            Some(ChannelMsg::RequestX11 {
                single_connection,
                x11_authentication_protocol,
                x11_authentication_cookie,
                x11_screen_number,
                ..
            }) if x11_kept(&x11_authentication_protocol, &x11_authentication_cookie) => {
                x11 = Some(X11Request {
                    single_connection,
                    auth_protocol: x11_authentication_protocol,
                    auth_cookie: x11_authentication_cookie,
                    screen: x11_screen_number,
                });
            }
            Some(ChannelMsg::RequestShell { .. }) => break Command::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Command::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                break Command::Sftp;
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == crate::CONNECT_SUBSYSTEM => {
                break Command::Connect;
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                debug!(subsystem = %name, "subsystem refused");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.close()).await;
                return;
            }
            // Input before there is a process for it is dropped, and its window given back.
            Some(ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. }) => {
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                let _ = ctx.handle.window_adjust(tx.id(), n);
            }
            Some(ChannelMsg::Eof) => early_eof = true,
            Some(_) => {}
            None => return,
        }
    };
    let label = match &command {
        Command::Shell => "shell".to_owned(),
        Command::Exec(c) => c.clone(),
        Command::Sftp => "subsystem sftp".to_owned(),
        Command::Connect => "berth connect".to_owned(),
    };
    // `?` quotes the command, so a newline in it cannot forge a log line. (The audit
    // record of the session is the gateway's, once its process runs.)
    debug!(user = %ctx.user, command = ?label, tty = pty.is_some(), "session requested");
    let tty = pty.is_some();
    // The forwarded agent lives exactly as long as this task (its accept loop is aborted and
    // its socket removed when the session ends).
    let mut _agent_task = None;
    if agent {
        let report = |refused: Option<&str>| {
            ctx.gateway.event(Event::Forward {
                user: &ctx.user,
                kind: ForwardKind::Agent,
                target: "",
                refused,
            });
        };
        if !ctx.allowed.agent_forwarding {
            report(Some("agent forwarding is not permitted by the certificate"));
        } else if !ctx
            .gateway
            .permits(&ctx.user, Permission::AgentForwarding)
            .await
        {
            report(Some("agent forwarding is off for this user"));
        } else {
            match ctx.gateway.agent_listener(&ctx.user).await {
                Ok(a) => {
                    report(None);
                    env.push(("SSH_AUTH_SOCK".to_owned(), a.path_in_container.clone()));
                    _agent_task = Some(AbortOnDropHandle::new(tokio::spawn(serve_agent(
                        a,
                        ctx.handle.clone(),
                        ctx.tenant.clone(),
                    ))));
                }
                Err(e) => report(Some(&e.0)),
            }
        }
    }
    let x11 = match x11 {
        Some(x)
            if ctx.allowed.x11_forwarding
                && ctx
                    .gateway
                    .permits(&ctx.user, Permission::X11Forwarding)
                    .await =>
        {
            Some(x)
        }
        Some(_) => {
            ctx.gateway.event(Event::Forward {
                user: &ctx.user,
                kind: ForwardKind::X11,
                target: "",
                refused: Some(if ctx.allowed.x11_forwarding {
                    "X11 forwarding is off for this user"
                } else {
                    "X11 forwarding is not permitted by the certificate"
                }),
            });
            None
        }
        None => None,
    };
    let req = OpenRequest {
        x11,
        user: ctx.user.clone(),
        key: ctx.key.clone(),
        peer: ctx.peer,
        connected_at: ctx.connected_at,
        command,
        pty,
        env,
    };
    // Opening can take seconds (container create/start). Keep reading the channel meanwhile
    // (russh stops the whole connection while one channel's queue is full): input waits in
    // the inbox, bounded by the client's window. The connection's loop made the inbox when
    // it saw the request, and pushes the input to it.
    let Ok((input, stdin)) = ctx.input.await else {
        return;
    };
    let _finish = Finish(input.companion());
    if early_eof && !tty {
        input.eof();
    }
    let mut resized = None;
    let opened = {
        let open = ctx.gateway.open(req);
        tokio::pin!(open);
        loop {
            tokio::select! {
                r = &mut open => break r,
                msg = rx.wait() => match take_input(msg, &input, tty) {
                    Taken::Resize(size) => resized = Some(size),
                    Taken::Nothing => {}
                    Taken::End => return,
                },
            }
        }
    };
    let process = match opened {
        Ok(p) => p,
        Err(e) => {
            // The client's window may be shut: the last words get a deadline.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let mut err = tx.make_writer_ext(Some(1));
                let _ = err.write_all(format!("berth: {e}\r\n").as_bytes()).await;
                let _ = tx.exit_status(255).await;
                let _ = tx.eof().await;
                let _ = tx.close().await;
            })
            .await;
            debug!("session refused: {e}");
            return;
        }
    };
    if !ctx
        .login_measured
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        metrics::histogram!("berth_login_duration_seconds")
            .record(ctx.connected_at.elapsed().as_secs_f64());
    }
    let mut process = process;
    if let Some(now) = process.stdin_now.take() {
        input.write_now(now);
    }
    // A terminal's output is read and sent by the connection's loop, as its input is
    // written there: a keystroke's echo never waits for this task. The loop waits to know.
    input.read_now(process.output_now.take());
    let _x11_task = process.x11.take().map(|l| {
        ctx.gateway.event(Event::Forward {
            user: &ctx.user,
            kind: ForwardKind::X11,
            target: "",
            refused: None,
        });
        AbortOnDropHandle::new(tokio::spawn(serve_x11(
            l,
            ctx.handle.clone(),
            ctx.tenant.clone(),
        )))
    });
    let status = pump(process, resized, rx, (input, stdin), &tx, tty).await;
    if status.is_none() {
        // The client went, or broke flow control: the channel is closed either way.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.close()).await;
    }
    debug!(status = ?status, "session ended");
}

/// How long a session's closing words on a failure (an error line, a close) may wait for
/// the client's window.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a channel message means for a session's input.
enum Taken {
    /// Held for the process, discarded, or of no concern to it.
    Nothing,
    Resize(WindowSize),
    /// The channel is gone, or the client broke flow control.
    End,
}

/// Routes one channel message: data to the inbox, EOF (not on a terminal: it has no
/// half-close, so closing its input would hang up the session, as sshd knows —
/// `ssh -tt host cmd </dev/null`), window changes to the caller.
fn take_input(msg: Option<ChannelMsg>, input: &InboxTx, tty: bool) -> Taken {
    match msg {
        // Only data the connection's loop did not take comes this way: before the inbox
        // was made, or past the window (refused here too, which ends the session). The
        // stdin writer is polled by this same task (`pump`), right after this.
        Some(ChannelMsg::Data { data }) => match input.push_here(data) {
            Ok(()) => Taken::Nothing,
            Err(Overrun) => {
                debug!(
                    held = input.held(),
                    "client sent past its window; session ended"
                );
                Taken::End
            }
        },
        // Nothing reads a session's extended input; its window is given back.
        Some(ChannelMsg::ExtendedData { data, .. }) => {
            input.discard(data.len());
            Taken::Nothing
        }
        Some(ChannelMsg::Eof) if !tty => {
            input.eof();
            Taken::Nothing
        }
        Some(ChannelMsg::WindowChange {
            col_width,
            row_height,
            ..
        }) => Taken::Resize(WindowSize {
            cols: clamp(col_width),
            rows: clamp(row_height),
        }),
        None | Some(ChannelMsg::Close) => Taken::End,
        Some(_) => Taken::Nothing,
    }
}

/// Runs the process to its end. Returns its exit code, or `None` when the client went
/// away first (the process is then ended by dropping its control).
///
/// The channel is read all the time: stdin is written by a future of its own, polled beside
/// the channel and the output (in this task: a keystroke reaches the terminal without a
/// wake of another task), so a process that is not reading stdin never stops window
/// changes, EOF or a close from arriving, nor its own output from flowing.
async fn pump(
    process: Process,
    resized: Option<WindowSize>,
    mut rx: russh::ChannelReadHalf,
    (input, stdin_rx): (InboxTx, InboxRx),
    tx: &ChannelWriteHalf<Msg>,
    tty: bool,
) -> Option<u32> {
    let Process {
        x11: _,
        stdin_now: _,
        output_now: _,
        stdin,
        output,
        mut control,
    } = process;
    let writer = write_stdin(stdin, stdin_rx);
    tokio::pin!(writer);
    let mut writing = true;
    if let Some(size) = resized {
        control.resize(size).await;
    }
    let out = if input.reads_output() {
        drop(output);
        futures_util::future::Either::Left(input.output_end())
    } else {
        futures_util::future::Either::Right(copy_output(
            output,
            tx.make_writer(),
            tx.make_writer_ext(Some(1)),
        ))
    };
    tokio::pin!(out);
    loop {
        tokio::select! {
            () = &mut out => break,
            () = &mut writer, if writing => writing = false,
            m = rx.wait() => match take_input(m, &input, tty) {
                Taken::Nothing => {}
                Taken::Resize(size) => control.resize(size).await,
                Taken::End => return None,
            },
        }
    }
    // The output has ended; the process may still run (it closed its stdout, or a child
    // holds nothing open). Wait for its end as sshd does, still reading the channel: input
    // goes on to the process, and a client that closes the channel ends the wait (and the
    // process, by dropping its control).
    let wait = control.wait();
    tokio::pin!(wait);
    let code = loop {
        tokio::select! {
            code = &mut wait => break code,
            () = &mut writer, if writing => writing = false,
            // Window changes: no output is left, so no terminal to size.
            m = rx.wait() => if let Taken::End = take_input(m, &input, tty) {
                return None;
            },
        }
    };
    // No deadline here: output still queued for a client that reads slowly (`| less`) must
    // reach it before the exit status; keepalives notice a client that is gone, and what a
    // client that never reads can hold is bounded by its caps.
    let _ = tx.exit_status(code).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
    Some(code)
}

/// Tells the connection's loop that the session's task has ended, when dropped: it lets
/// the terminal go and forgets the channel ([`InboxTx::finish`]).
struct Finish(InboxTx);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Feeds the process's stdin, granting the client more window as the process takes it in;
/// stops quietly when the process no longer reads it (the inbox then discards).
async fn write_stdin(mut stdin: std::pin::Pin<Box<dyn AsyncWrite + Send>>, input: InboxRx) {
    // The process closed its stdin: what it did not take is dropped, as sshd does.
    if input.write_to(&mut stdin, relayed).await == Drained::End {
        // The client's EOF. Some writers (a pipe) only close when dropped, which returning
        // does.
        let _ = stdin.shutdown().await;
    }
}

/// Each connection to the agent socket in the container becomes an agent channel to the
/// client.
async fn serve_agent(agent: crate::AgentListener, handle: russh::server::Handle, tenant: Tenant) {
    let _hold = agent.hold;
    crate::tunnel::serve_listener(
        agent.listener,
        "agent socket",
        handle.clone(),
        tenant,
        move |_| {
            let handle = handle.clone();
            async move { handle.channel_open_agent().await }
        },
    )
    .await;
}

/// Each connection to the session's X11 display in the container becomes an X11 channel
/// to the client, whose ssh checks and replaces the cookie.
async fn serve_x11(
    listener: tokio::net::TcpListener,
    handle: russh::server::Handle,
    tenant: Tenant,
) {
    crate::tunnel::serve_listener(listener, "x11", handle.clone(), tenant, move |peer| {
        let handle = handle.clone();
        let (address, port) = crate::tunnel::origin(peer);
        async move { handle.channel_open_x11(address, port).await }
    })
    .await;
}

async fn copy_output(
    mut output: std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Output>> + Send>>,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
) {
    while let Some(chunk) = output.next().await {
        let r = match chunk {
            Ok(Output::Stdout(b)) if !b.is_empty() => {
                relayed(b.len());
                stdout.write_all(&b).await
            }
            Ok(Output::Stderr(b)) if !b.is_empty() => {
                relayed(b.len());
                stderr.write_all(&b).await
            }
            Ok(_) => Ok(()),
            Err(e) => {
                debug!(error = %e, "process output failed");
                return;
            }
        };
        if r.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_allow_list() {
        let acc = vec!["LANG".to_owned(), "LC_*".to_owned()];
        assert!(env_allowed(&acc, "LANG"));
        assert!(env_allowed(&acc, "LC_ALL"));
        assert!(!env_allowed(&acc, "LANGUAGE"));
        assert!(!env_allowed(&acc, "LD_PRELOAD"));
        assert!(!env_allowed(&[], "LANG"));
    }
}
