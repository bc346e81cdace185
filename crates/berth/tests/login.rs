//! End-to-end: logging in with the stock OpenSSH client, through a real daemon, into real
//! Docker containers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::time::Duration;

use berth_testkit::{BUSYBOX, DEBIAN, Daemon, DaemonOptions, docker, in_terminal};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// A terminal line without escape sequences and carriage returns.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Runs `script` with `sh -c`, asserts it succeeded, and returns its output.
fn sh_ok(script: &str) -> String {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn start() -> Daemon {
    Daemon::start(Path::new(BIN), DaemonOptions::default())
}

#[test]
fn exec_keeps_streams_apart_and_returns_the_exit_code() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let o = d.ssh_run("alice", &key, "echo out; echo err >&2; exit 7", b"");
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    // Root, in the container, via /bin/sh -c.
    assert_eq!(d.ssh_ok("alice", &key, "id -u; echo $0"), "0\n/bin/sh\n");
    assert_eq!(d.ssh_ok("alice", &key, "hostname"), "alice\n");
    assert_eq!(d.ssh_ok("alice", &key, "pwd"), "/root\n");
    // A command that cannot be found is 127, like sh.
    assert_eq!(
        d.ssh_run("alice", &key, "no-such-command", b"")
            .status
            .code(),
        Some(127)
    );
}

#[test]
fn sessions_are_children_of_the_containers_init_under_its_confinement() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let fields = "grep -E '^(PPid|NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/$$/status";
    let init = "grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/1/status";
    let out = d.ssh_ok(
        "alice",
        &key,
        &format!("{fields}; echo; {init}; cat /proc/$$/cgroup /proc/1/cgroup"),
    );
    let (mine, rest) = out.split_once("\n\n").unwrap();
    // Started by init itself (a Docker exec's parent is outside the container: PPid 0).
    assert!(mine.contains("PPid:\t1\n"), "{out}");
    // The same confinement as init: no_new_privs, seccomp filter, capabilities, cgroup.
    assert!(mine.contains("NoNewPrivs:\t1"), "{out}");
    assert!(mine.contains("Seccomp:\t2"), "{out}");
    let caps = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with("Cap") || l.starts_with("NoNew") || l.starts_with("Secc"))
            .map(str::to_owned)
            .collect()
    };
    let init_lines: Vec<&str> = rest.lines().collect();
    assert_eq!(caps(mine), caps(&init_lines[..4].join("\n")), "{out}");
    let cgroups = &init_lines[4..];
    assert_eq!(
        cgroups[..cgroups.len() / 2],
        cgroups[cgroups.len() / 2..],
        "{out}"
    );
    // A terminal session too: its terminal is the container's own.
    let o = d
        .ssh("alice", &key)
        .args(["-tt", "grep PPid /proc/$$/status; tty"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert!(text.contains("PPid:\t1\n/dev/pts/"), "{text}");
    // And the engine ran no exec at all.
    let container = d.container_name("alice");
    assert_eq!(
        docker(&["inspect", "-f", "{{len .ExecIDs}}", &container]).trim(),
        "0"
    );
}

#[test]
fn stdin_is_streamed_with_eof_and_bytes_survive() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let o = d.ssh_run("alice", &key, "cat", b"x\n");
    assert!(o.status.success());
    assert_eq!(o.stdout, b"x\n");
    // 4 MiB of every byte value, round trip through cat, intact (no TTY framing guesses).
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let o = d.ssh_run("alice", &key, "cat", &data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "data corrupted");
    // wc sees the EOF and the right count.
    let o = d.ssh_run("alice", &key, "wc -c", &data);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        data.len().to_string()
    );
    // A process that closed its output still gets its input, and its exit code counts
    // (the session waits for the process, as sshd does, not for the end of the output).
    let o = d.ssh_run(
        "alice",
        &key,
        "exec >&- 2>&-; cat > /tmp/in; sleep 1; exit 5",
        b"late input\n",
    );
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(d.ssh_ok("alice", &key, "cat /tmp/in"), "late input\n");
    // Output that starts with 0x00-0x02 passes unharmed, with and without a TTY.
    let o = d.ssh_run("alice", &key, r"printf '\000\001\002end'", b"");
    assert_eq!(o.stdout, b"\x00\x01\x02end");
    let o = d
        .ssh("alice", &key)
        .args(["-tt", r"printf '\001\002end'"])
        .output()
        .unwrap();
    assert_eq!(
        o.stdout,
        b"\x01\x02end",
        "{:?}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Input typed or pasted faster than the terminal's program reads fills the terminal's
/// input queue (64 KiB): the daemon then waits for room and loses nothing. (It asks the
/// reactor about room only while the queue is full: a write that finds it full is how that
/// path starts, and a wait that is never woken would hang here.)
#[test]
fn terminal_input_past_a_full_queue_arrives_whole() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let ssh = format!("ssh {}", d.ssh_args(&key).join(" "));
    // 256 KiB in whole lines of 16 bytes (a canonical terminal keeps whole lines while its
    // program does not read), while the program sleeps; then it reads all of it.
    let script = format!(
        "yes aaaaaaaaaaaaaaa | head -c 262144 | timeout 60 {ssh} -tt alice@127.0.0.1 \
         'stty -echo; sleep 3; head -c 262144 | wc -c'"
    );
    let out = sh_ok(&script);
    // Lines typed before `stty -echo` ran are echoed; the only digits are wc's count.
    let digits: String = out.chars().filter(char::is_ascii_digit).collect();
    assert_eq!(digits, "262144", "{out}");
}

/// A terminal's output reaches the client with nothing typed and the client's input left
/// open: the connection's loop, which reads the terminal, learns of it when the process
/// opens. Keepalives are far off here, so no other packet would turn the loop.
#[test]
fn a_terminal_s_output_comes_with_no_input_at_all() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            config: "keepalive_interval_seconds = 300\n".into(),
            ..DaemonOptions::default()
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let mut child = std::process::Command::new("timeout")
        .arg("30")
        .arg("ssh")
        .args(d.ssh_args(&key))
        .args(["-tt", "alice@127.0.0.1", "echo hello-from-the-terminal"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Held open and silent until the end: no keystroke, no EOF.
    let _silent = child.stdin.take();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("hello-from-the-terminal"),
        "{:?} {out} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Input reaches a terminal whole and in the order typed while the terminal fills and
/// drains in turn (written at once by the connection's loop, or queued for the session's
/// writer while the terminal is full). An overtaking is rare here (the terminal seldom has
/// room while input is queued): the order itself rests on the inbox's lock.
#[test]
fn terminal_input_keeps_its_order_as_the_terminal_fills_and_drains() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let ssh = format!("ssh {}", d.ssh_args(&key).join(" "));
    // The program stops reading twice (its terminal and the client's window fill up), and
    // reads in between, line by line (a canonical terminal hands out one line per read).
    let script = format!(
        "seq 1 40000 | md5sum; seq 1 40000 | timeout 90 {ssh} -tt alice@127.0.0.1 \
         'stty -echo; sleep 2; (head -n 15000; sleep 1; head -n 25000) | md5sum'"
    );
    let out = sh_ok(&script);
    // The local sum comes first, on its own; the remote one after the lines echoed before
    // `stty -echo` ran (the last of them may lack its line end).
    let local = out.split_whitespace().next().unwrap_or_default();
    assert_eq!(local.len(), 32, "{out}");
    assert_eq!(
        out.matches(local).count(),
        2,
        "the input came out of order: {out}"
    );
}

#[test]
fn tty_size_term_and_resize_reach_the_program() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let ssh = format!("ssh {}", d.ssh_args(&key).join(" "));
    // Initial size and TERM.
    let out = in_terminal(
        &format!(
            "stty cols 91 rows 33; TERM=xterm-test {ssh} -t alice@127.0.0.1 'stty size; echo term=$TERM; tty'"
        ),
        Duration::from_secs(30),
    );
    assert!(out.contains("33 91"), "{out}");
    assert!(out.contains("term=xterm-test"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    // A resize during the session reaches the program: the terminal is resized once the
    // session has printed its first size (a login that starts her container can take a
    // while on a busy machine).
    let script = format!(
        "f=$(mktemp); stty cols 80 rows 24; {ssh} -t alice@127.0.0.1 \
         'stty size; i=0; while [ \"$(stty size)\" != \"40 120\" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo now $(stty size)' </dev/tty >$f 2>&1 & p=$!; \
         i=0; until grep -q '24 80' $f || [ $i -ge 600 ]; do sleep 0.1; i=$((i+1)); done; \
         stty cols 120 rows 40; kill -WINCH $p; wait $p; cat $f; rm -f $f"
    );
    let out = in_terminal(&script, Duration::from_secs(90));
    assert!(out.contains("24 80"), "{out}");
    assert!(out.contains("now 40 120"), "{out}");
}

#[test]
fn interactive_login_shell_busybox_and_debian() {
    let d = start();
    // The image's login shell for root, started as a login shell (-l).
    for (user, image, shell) in [("bb", BUSYBOX, "/bin/sh"), ("deb", DEBIAN, "/bin/bash")] {
        let key = d.add_user(user, image);
        let ssh = format!("ssh {}", d.ssh_args(&key).join(" "));
        // Type commands into the remote login shell over a real terminal.
        let out = in_terminal(
            &format!(
                "(sleep 2; printf 'echo shell=$0 uid=$(id -u) home=$HOME; echo $((6*7))\\n'; sleep 1; printf 'exit 0\\n') | {ssh} -tt {user}@127.0.0.1"
            ),
            Duration::from_secs(40),
        );
        assert!(
            out.contains(&format!("shell={shell} uid=0 home=/root")),
            "{image}: {out}"
        );
        assert!(out.contains("42"), "{image}: {out}");
    }
    // Debian's bash knows it is a login shell.
    let key = d.dir.path().join("key-deb");
    let ssh = format!("ssh {}", d.ssh_args(&key).join(" "));
    let out = in_terminal(
        &format!(
            "(sleep 2; printf 'shopt -q login_shell && echo is-login\\n'; sleep 1; printf 'exit\\n') | {ssh} -tt deb@127.0.0.1"
        ),
        Duration::from_secs(40),
    );
    assert!(out.lines().any(|l| plain(l) == "is-login"), "{out}");
}

#[test]
fn unknown_user_and_wrong_key_look_the_same() {
    let d = start();
    let _key = d.add_user("alice", BUSYBOX);
    let other = d.keygen("mallory");
    let wrong_key = d.ssh_run("alice", &other, "true", b"");
    let no_user = d.ssh_run("nobody", &other, "true", b"");
    let bad_name = d.ssh_run("Not.A.User", &other, "true", b"");
    for o in [&wrong_key, &no_user, &bad_name] {
        assert_eq!(o.status.code(), Some(255));
        assert!(o.stdout.is_empty());
    }
    let norm =
        |o: &std::process::Output, u: &str| String::from_utf8_lossy(&o.stderr).replace(u, "USER");
    assert_eq!(norm(&wrong_key, "alice"), norm(&no_user, "nobody"));
    assert_eq!(
        norm(&wrong_key, "alice"),
        "USER@127.0.0.1: Permission denied (publickey).\r\n"
    );
    assert!(
        d.container_state("alice").is_none(),
        "a refused login must not create a container"
    );
    assert!(d.log().contains("\"event\":\"login_refused\""));
}

#[test]
fn a_container_that_cannot_start_gets_one_clear_line() {
    let d = start();
    // An image that exists when the user is added and is gone at login.
    let tag = format!("berth-test/vanishing:{}", std::process::id());
    docker(&["tag", BUSYBOX, &tag]);
    let key = d.add_user("ghost", &tag);
    docker(&["rmi", &tag]);
    let o = d.ssh_run("ghost", &key, "true", b"");
    assert_eq!(o.status.code(), Some(255));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "berth: your container's image is missing on this server; ask the administrator\r\n"
    );
    assert!(d.container_state("ghost").is_none());
}

#[test]
fn each_user_has_one_persistent_private_container() {
    let d = start();
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    d.ssh_ok("alice", &ka, "echo secret > /root/note");
    // Sessions share the container: the file is seen from a second session at once.
    assert_eq!(d.ssh_ok("alice", &ka, "cat /root/note"), "secret\n");
    // Bob's container is another one, without the file.
    let o = d.ssh_run("bob", &kb, "cat /root/note", b"");
    assert_eq!(o.status.code(), Some(1));
    assert_ne!(
        d.ssh_ok("alice", &ka, "hostname"),
        d.ssh_ok("bob", &kb, "hostname")
    );
    // Named after the user and labelled as Berth's.
    let name = d.container_name("alice");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"berth.user\"}}",
            &name
        ]),
        "alice"
    );
    // Still there after the container was stopped and started again.
    assert!(berth_testkit::wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    assert_eq!(d.ssh_ok("alice", &ka, "cat /root/note"), "secret\n");
    // Bob cannot reach alice's container over the network either (no inter-container traffic).
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &name,
    ]);
    assert!(!ip.is_empty());
    d.ssh_ok(
        "alice",
        &ka,
        "daemon_check=1; (nc -l -p 4000 >/dev/null 2>&1 &) ; sleep 0.2",
    );
    let o = d.ssh_run(
        "bob",
        &kb,
        &format!("echo hi | nc -w 2 {ip} 4000 && echo reached"),
        b"",
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("reached"));
}

#[test]
fn a_removed_key_ends_its_open_connection_and_opens_nothing_more() {
    let d = start();
    let k1 = d.add_user("alice", BUSYBOX);
    let k2 = d.keygen("spare");
    d.berth_ok(&[
        "user",
        "key",
        "add",
        "alice",
        "--key",
        k2.with_extension("pub").to_str().unwrap(),
    ]);
    // A multiplexing master connection authenticated with the first key.
    let sock = d.dir.path().join("mux");
    let mux = |extra: &[&str]| {
        let mut c = d.ssh("alice", &k1);
        c.args(["-S", sock.to_str().unwrap()]).args(extra);
        c
    };
    let st = mux(&["-M", "-f", "-N", "-o", "ControlPersist=60"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        mux(&["-O", "check"]).output().unwrap().status.success(),
        "no master"
    );
    let o = mux(&["echo via-master"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "via-master\n");
    // Remove the master's key (given as its file).
    d.berth_ok(&[
        "user",
        "key",
        "rm",
        "alice",
        k1.with_extension("pub").to_str().unwrap(),
    ]);
    assert_eq!(
        d.berth_ok(&["user", "key", "list", "alice", "--json"])
            .matches("fingerprint")
            .count(),
        1
    );
    // The master connection itself ends (tenants.rs times it), and nothing more is opened
    // with that key: a new session falls back to a new connection, which is refused.
    assert!(
        berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
            !mux(&["-O", "check"]).output().unwrap().status.success()
        }),
        "the removed key's connection stayed open"
    );
    let o = mux(&["echo still"]).output().unwrap();
    assert_eq!(o.status.code(), Some(255));
    assert!(o.stdout.is_empty());
}
