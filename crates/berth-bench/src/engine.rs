//! A small blocking client for the Docker Engine API on its unix socket: enough to measure
//! the floor (start, create, exec through the same API Berth uses) without a process spawn
//! per call, and to clean up what the run made.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

pub struct Engine {
    socket: PathBuf,
}

struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
}

impl Engine {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// Sends one request on a fresh connection and reads the response head.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        upgrade: bool,
    ) -> Result<(BufReader<UnixStream>, Head)> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("docker socket {}", self.socket.display()))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let conn = if upgrade {
            "Connection: Upgrade\r\nUpgrade: tcp\r\n"
        } else {
            "Connection: close\r\n"
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\n{conn}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("docker: bad status line {line:?}"))?;
        let mut head = Head {
            status,
            chunked: false,
            length: None,
        };
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                head.length = v.trim().parse().ok();
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                head.chunked = true;
            }
        }
        Ok((reader, head))
    }

    /// One request; returns the status and the body (which must be 2xx unless `lenient`).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let (mut reader, head) = self.send(method, path, body, false)?;
        let mut bytes = Vec::new();
        if head.chunked {
            let mut line = String::new();
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .map_err(|_| anyhow!("docker: bad chunk size {line:?}"))?;
                if size == 0 {
                    break;
                }
                let start = bytes.len();
                bytes.resize(start + size, 0);
                reader.read_exact(bytes.get_mut(start..).unwrap_or_default())?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = head.length {
            bytes.resize(n, 0);
            reader.read_exact(&mut bytes)?;
        } else if head.status != 204 && head.status != 304 {
            reader.read_to_end(&mut bytes)?;
        }
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((head.status, value))
    }

    /// One request that must succeed (2xx, or 304 "already in that state").
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, value) = self.call(method, path, body)?;
        if !(200..300).contains(&status) && status != 304 {
            let msg = value
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned);
            bail!("docker {method} {path}: {status}: {msg}");
        }
        Ok(value)
    }

    pub fn version(&self) -> Result<Value> {
        self.ok("GET", "/version", None)
    }

    /// `docker inspect`; `None` when there is no such container.
    pub fn inspect(&self, name: &str) -> Result<Option<Value>> {
        let (status, v) = self.call("GET", &format!("/containers/{name}/json"), None)?;
        Ok(match status {
            404 => None,
            200 => Some(v),
            _ => bail!("docker inspect {name}: {status}: {v}"),
        })
    }

    pub fn running(&self, name: &str) -> Result<Option<bool>> {
        Ok(self.inspect(name)?.map(|v| {
            v.pointer("/State/Running")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        }))
    }

    pub fn create(&self, name: &str, body: &Value) -> Result<String> {
        let v = self.ok(
            "POST",
            &format!("/containers/create?name={name}"),
            Some(body),
        )?;
        id_of(&v)
    }

    pub fn start(&self, id: &str) -> Result<()> {
        self.ok("POST", &format!("/containers/{id}/start"), None)
            .map(drop)
    }

    pub fn stop(&self, id: &str) -> Result<()> {
        self.ok("POST", &format!("/containers/{id}/stop?t=5"), None)
            .map(drop)
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        let (status, v) = self.call("DELETE", &format!("/containers/{id}?force=1&v=1"), None)?;
        if status != 204 && status != 404 {
            bail!("docker rm {id}: {status}: {v}");
        }
        Ok(())
    }

    /// Runs `cmd` in a running container through the exec API, attached, until it ends
    /// (create + start; the hijacked stream closes when the process exits). Returns the
    /// exec's id, for [`Engine::exit_code`].
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Result<String> {
        let v = self.ok(
            "POST",
            &format!("/containers/{container}/exec"),
            Some(&json!({ "AttachStdout": true, "AttachStderr": true, "Cmd": cmd })),
        )?;
        let id = id_of(&v)?;
        let (mut reader, head) = self.send(
            "POST",
            &format!("/exec/{id}/start"),
            Some(&json!({ "Detach": false, "Tty": false })),
            true,
        )?;
        if head.status != 101 && head.status != 200 {
            bail!("docker exec start: {}", head.status);
        }
        std::io::copy(&mut reader, &mut std::io::sink())?;
        Ok(id)
    }

    pub fn exit_code(&self, exec_id: &str) -> Result<i64> {
        let v = self.ok("GET", &format!("/exec/{exec_id}/json"), None)?;
        v.get("ExitCode")
            .and_then(Value::as_i64)
            .ok_or_else(|| anyhow!("exec {exec_id} has no exit code"))
    }

    /// The array a listing endpoint (`path`, ending in `?` or a query) returns for one
    /// filter `key=value`.
    fn list(&self, path: &str, key: &str, value: &str) -> Result<Vec<Value>> {
        let filters = json!({ key: [value] }).to_string();
        let sep = if path.ends_with('?') { "" } else { "&" };
        let v = self.ok(
            "GET",
            &format!(
                "{path}{sep}filters={}",
                utf8_percent_encode(&filters, NON_ALPHANUMERIC)
            ),
            None,
        )?;
        match v {
            Value::Array(items) => Ok(items),
            other => bail!("GET {path}: expected a list, got {other}"),
        }
    }

    /// `(id, name)` of every container, stopped ones included, whose name matches the
    /// regular expression `pattern` (Docker's name filter; names start with `/`).
    pub fn containers_matching(&self, pattern: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .list("/containers/json?all=1", "name", pattern)?
            .iter()
            .filter_map(|c| {
                let id = c.get("Id")?.as_str()?.to_owned();
                let name = c.pointer("/Names/0")?.as_str()?.trim_start_matches('/');
                Some((id, name.to_owned()))
            })
            .collect())
    }

    /// Names of images whose reference matches `reference` (e.g. `bench12/*`).
    pub fn images_matching(&self, reference: &str) -> Result<Vec<String>> {
        Ok(self
            .list("/images/json?", "reference", reference)?
            .iter()
            .filter_map(|i| i.get("Id")?.as_str().map(str::to_owned))
            .collect())
    }

    pub fn remove_image(&self, id: &str) -> Result<()> {
        let (status, v) = self.call("DELETE", &format!("/images/{id}?force=1"), None)?;
        if status != 200 && status != 404 {
            bail!("docker rmi {id}: {status}: {v}");
        }
        Ok(())
    }

    /// Names of the networks whose name matches `pattern`.
    pub fn networks_matching(&self, pattern: &str) -> Result<Vec<String>> {
        Ok(self
            .list("/networks?", "name", pattern)?
            .iter()
            .filter_map(|n| n.get("Name")?.as_str().map(str::to_owned))
            .collect())
    }

    pub fn remove_network(&self, name: &str) -> Result<()> {
        let (status, v) = self.call("DELETE", &format!("/networks/{name}"), None)?;
        if status != 204 && status != 404 {
            bail!("docker network rm {name}: {status}: {v}");
        }
        Ok(())
    }
}

fn id_of(v: &Value) -> Result<String> {
    v.get("Id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("docker: no Id in {v}"))
}

/// A create body that makes a container the way `original` (an inspect) was made: same
/// image, command, mounts, limits, security options and network, minus its name, hostname
/// and Berth's labels (so Berth never takes it for one of its own).
pub fn clone_body(original: &Value) -> Result<Value> {
    let mut config = original
        .get("Config")
        .cloned()
        .ok_or_else(|| anyhow!("inspect without Config"))?;
    let host = original
        .get("HostConfig")
        .cloned()
        .ok_or_else(|| anyhow!("inspect without HostConfig"))?;
    if let Some(obj) = config.as_object_mut() {
        obj.remove("Hostname");
        obj.remove("Labels");
        obj.insert("HostConfig".into(), host);
    }
    Ok(config)
}
