//! One session channel, owned by one task from its first message to its close.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::{Command, Gateway, OpenRequest, Output, Process, Pty, WindowSize};

pub(crate) struct Context<G> {
    pub gateway: Arc<G>,
    pub user: String,
    pub peer: Option<SocketAddr>,
    pub accept_env: Arc<Vec<String>>,
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
    // Setup: collect pty and env until the client asks for a shell or a command.
    let command = loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
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
                if env_allowed(&ctx.accept_env, &variable_name) && env.len() < 64 {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Command::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Command::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                debug!(subsystem = %name, "subsystem refused");
                let _ = tx.close().await;
                return;
            }
            Some(_) => {}
            None => return,
        }
    };
    let label = match &command {
        Command::Shell => "shell".to_owned(),
        Command::Exec(c) => c.clone(),
    };
    info!(target: "audit", event = "session_start", user = %ctx.user, command = %label, tty = pty.is_some(), "session started");
    let tty = pty.is_some();
    let req = OpenRequest {
        user: ctx.user.clone(),
        peer: ctx.peer,
        command,
        pty,
        env,
    };
    let process = match ctx.gateway.open(req).await {
        Ok(p) => p,
        Err(e) => {
            let mut err = tx.make_writer_ext(Some(1));
            let _ = err.write_all(format!("berth: {e}\r\n").as_bytes()).await;
            let _ = tx.exit_status(255).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            info!(target: "audit", event = "session_end", user = %ctx.user, status = 255, "session refused: {e}");
            return;
        }
    };
    let status = pump(process, rx, &tx, tty).await;
    info!(target: "audit", event = "session_end", user = %ctx.user, status = ?status, "session ended");
}

/// Runs the process to its end. Returns its exit code, or `None` when the client went
/// away first (the process is then ended by dropping its control).
async fn pump(
    process: Process,
    mut rx: russh::ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    tty: bool,
) -> Option<u32> {
    let Process {
        mut stdin,
        output,
        mut control,
    } = process;
    let stdout = tx.make_writer();
    let stderr = tx.make_writer_ext(Some(1));
    let out = copy_output(output, stdout, stderr);
    tokio::pin!(out);
    let mut stdin_open = true;
    loop {
        tokio::select! {
            () = &mut out => break,
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) if stdin_open => {
                    // Writing stdin must not stop output from flowing, or a process that
                    // fills its output before reading would deadlock us.
                    tokio::select! {
                        r = stdin.write_all(&data) => if r.is_err() { stdin_open = false },
                        () = &mut out => break,
                    }
                }
                // A terminal has no half-close: closing its input would hang up the session,
                // so EOF on a TTY session is ignored, as sshd does (`ssh -tt host cmd </dev/null`).
                Some(ChannelMsg::Eof) if stdin_open && !tty => {
                    stdin_open = false;
                    let _ = stdin.shutdown().await;
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    control.resize(WindowSize { cols: clamp(col_width), rows: clamp(row_height) }).await;
                }
                Some(_) => {}
                None => return None,
            },
        }
    }
    let code = control.wait().await;
    let _ = tx.exit_status(code).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
    Some(code)
}

async fn copy_output(
    mut output: std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Output>> + Send>>,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
) {
    while let Some(chunk) = output.next().await {
        let r = match chunk {
            Ok(Output::Stdout(b)) if !b.is_empty() => stdout.write_all(&b).await,
            Ok(Output::Stderr(b)) if !b.is_empty() => stderr.write_all(&b).await,
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
