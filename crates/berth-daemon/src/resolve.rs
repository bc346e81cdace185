//! Names for `-L`/`-D` resolved the way the container resolves them: its `/etc/hosts` first,
//! then the name servers of its `/etc/resolv.conf`, asked from inside its network namespace
//! (Docker's embedded DNS at 127.0.0.11 answers there and only there).
//!
//! The container's files are read through its root directory with `openat2(RESOLVE_IN_ROOT)`:
//! a symlink the user planted (`/etc/hosts -> /etc/shadow`) resolves inside the container,
//! never to a host file. Reads are size-bounded; the answer is only ever used as an address.
//!
//! Only the UDP sockets are made in the namespace ([`berth_runtime::sockets_in_netns`]); the
//! questions are asked from the runtime, asynchronously, under the caller's deadline: a name
//! server that never answers holds a socket until then, never a thread.

use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use nix::sys::socket::{AddressFamily, SockType};
use tokio::time::Instant;

/// Bytes read at most from a container's `/etc/hosts` or `/etc/resolv.conf`.
const FILE_CAP: u64 = 1 << 20;
/// How long one name server gets for one question (within the overall deadline).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Addresses tried at most for one name.
pub const MAX_ADDRESSES: usize = 4;
/// Name servers asked at most (glibc's MAXNS).
const MAX_SERVERS: usize = 3;

/// Resolves `host` as the container with network namespace `ns` and root directory `root`
/// would, for user `owner`, giving up at `deadline` (the container's user controls its files
/// and name servers, and they may never answer). At most [`MAX_ADDRESSES`] addresses are
/// returned. `hold` is kept by the thread that reads the container's files until that
/// thread ends, also when the lookup gave up on it before (a user's slot, so that reads she
/// keeps waiting still count against her).
pub async fn resolve_in_container<H: Send + 'static>(
    ns: &std::fs::File,
    root: &std::fs::File,
    owner: &str,
    host: &str,
    deadline: Instant,
    hold: H,
) -> std::io::Result<Vec<IpAddr>> {
    let not_found = || {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "name not known in the container",
        )
    };
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "name lookup in the container timed out",
        )
    };
    if host.is_empty() || host.len() > 253 {
        return Err(not_found());
    }
    // The files are read off the runtime (the container's tree decides how long that takes).
    let root = root.try_clone()?;
    let files = tokio::task::spawn_blocking(move || {
        let _hold = hold;
        (
            read_in_root(&root, "etc/hosts"),
            read_in_root(&root, "etc/resolv.conf"),
        )
    });
    let (hosts, conf) = tokio::time::timeout_at(deadline, files)
        .await
        .map_err(|_| timed_out())?
        .map_err(std::io::Error::other)?;
    if let Some(hosts) = hosts {
        let mut found = lookup_hosts(&hosts, host);
        if !found.is_empty() {
            found.truncate(MAX_ADDRESSES);
            return Ok(found);
        }
    }
    let conf = conf
        .and_then(|t| resolv_conf::Config::parse(t.as_bytes()).ok())
        .unwrap_or_default();
    let servers: Vec<IpAddr> = conf
        .get_nameservers_or_local()
        .iter()
        .map(IpAddr::from)
        .take(MAX_SERVERS)
        .collect();
    let mut names = vec![host.trim_end_matches('.').to_owned()];
    if !host.contains('.') {
        for domain in conf.get_search().into_iter().flatten().take(6) {
            names.push(format!("{host}.{domain}"));
        }
    }
    // One socket per name server, made in the container's namespace in one go, each asked
    // from here.
    let kinds: Vec<_> = servers
        .iter()
        .map(|s| match s {
            IpAddr::V4(_) => (AddressFamily::Inet, SockType::Datagram),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockType::Datagram),
        })
        .collect();
    let sockets =
        tokio::time::timeout_at(deadline, berth_runtime::sockets_in_netns(ns, owner, &kinds))
            .await
            .map_err(|_| timed_out())??;
    let mut asked = Vec::new();
    for (server, fd) in servers.iter().zip(sockets) {
        let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
        // A server the namespace cannot reach is skipped, not fatal.
        if socket.connect((*server, 53)).await.is_ok() {
            asked.push(socket);
        }
    }
    for name in &names {
        for socket in &asked {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            if let Ok(mut found) = ask(socket, name, deadline).await
                && !found.is_empty()
            {
                found.truncate(MAX_ADDRESSES);
                return Ok(found);
            }
        }
    }
    if Instant::now() >= deadline {
        return Err(timed_out());
    }
    Err(not_found())
}

/// The text of `path` under `root`, resolved inside it; `None` when missing, not a regular
/// file on an ordinary file system, or unreadable.
///
/// The path is first opened with `O_PATH` (which opens nothing: no device is touched, no
/// driver runs), checked to be a regular file outside proc and sysfs (whose "files" have side
/// effects: `/proc/kmsg` drains the kernel log), and only then opened for reading.
fn read_in_root(root: &std::fs::File, path: &str) -> Option<String> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use nix::sys::statfs::{PROC_SUPER_MAGIC, SYSFS_MAGIC, fstatfs};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let handle = std::fs::File::from(nix::fcntl::openat2(root.as_fd(), path, how).ok()?);
    if !handle.metadata().ok()?.is_file() {
        return None;
    }
    let fs = fstatfs(&handle).ok()?.filesystem_type();
    if fs == PROC_SUPER_MAGIC || fs == SYSFS_MAGIC {
        return None;
    }
    // Re-open what was checked (not the path again, which the user could swap meanwhile).
    let file = std::fs::File::open(format!("/proc/self/fd/{}", handle.as_raw_fd())).ok()?;
    let mut text = String::new();
    file.take(FILE_CAP).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The addresses `/etc/hosts`-format `text` gives `host` (case-insensitive, like glibc).
fn lookup_hosts(text: &str, host: &str) -> Vec<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let ip = fields.next()?.parse::<IpAddr>().ok()?;
            fields.any(|n| n.eq_ignore_ascii_case(host)).then_some(ip)
        })
        .collect()
}

/// Asks the name server `socket` is connected to for the A and AAAA records of `name`; IPv4
/// first. Waits for each answer at most [`QUERY_TIMEOUT`] and never past `deadline`, whatever
/// arrives meanwhile.
async fn ask(
    socket: &tokio::net::UdpSocket,
    name: &str,
    deadline: Instant,
) -> std::io::Result<Vec<IpAddr>> {
    let fqdn = Name::from_ascii(format!("{name}."))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut found = Vec::new();
    for kind in [RecordType::A, RecordType::AAAA] {
        let id: u16 = rand_id();
        let mut q = Message::new();
        q.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(fqdn.clone(), kind));
        let until = deadline.min(Instant::now() + QUERY_TIMEOUT);
        let exchange = async {
            socket
                .send(&q.to_vec().map_err(std::io::Error::other)?)
                .await?;
            let mut buf = [0u8; 4096];
            // Skip stray datagrams (another id) until the answer or the time is up.
            loop {
                let n = socket.recv(&mut buf).await?;
                if let Ok(m) = Message::from_vec(buf.get(..n).unwrap_or_default())
                    && m.id() == id
                    && m.message_type() == MessageType::Response
                {
                    return Ok::<_, std::io::Error>(m);
                }
            }
        };
        let answer = tokio::time::timeout_at(until, exchange)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if answer.response_code() != ResponseCode::NoError {
            continue;
        }
        found.extend(answer.answers().iter().filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        }));
    }
    Ok(found)
}

/// A query id nobody can predict from outside (it keeps answers apart).
fn rand_id() -> u16 {
    getrandom::u32().map_or(0x4242, |n| (n & 0xffff) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_match_any_alias_ignoring_case_and_comments() {
        let text = "127.0.0.1 localhost\n10.0.0.5  db  Database.lan # main\n# 10.9.9.9 db\nbad line\n::1 db\n";
        assert_eq!(
            lookup_hosts(text, "DATABASE.lan"),
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(lookup_hosts(text, "db").len(), 2);
        assert!(lookup_hosts(text, "main").is_empty());
    }

    #[test]
    fn files_are_read_inside_the_root_even_through_absolute_symlinks() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("etc"))?;
        std::fs::write(dir.path().join("inner"), "192.0.2.7 planted\n")?;
        // An absolute symlink resolves inside the root, not on the host.
        std::os::unix::fs::symlink("/inner", dir.path().join("etc/hosts"))?;
        let root = std::fs::File::open(dir.path())?;
        let text = read_in_root(&root, "etc/hosts");
        assert_eq!(text.as_deref(), Some("192.0.2.7 planted\n"));
        std::os::unix::fs::symlink(
            "/../../../../etc/passwd",
            dir.path().join("etc/resolv.conf"),
        )?;
        assert_eq!(read_in_root(&root, "etc/resolv.conf"), None);
        Ok(())
    }
}
