//! SSH user certificates (OpenSSH's `TrustedUserCAKeys` and `RevokedKeys`): organisations
//! sign their users' keys with a CA instead of copying keys to every server. A certificate
//! logs in as a Berth user when a trusted CA signed it, it is valid now, it is a *user*
//! certificate, its principals name that user, its `source-address` (if any) holds the
//! client's address, it has no critical option Berth does not know, nothing in the revoked
//! keys refuses it, and the user exists (certificates never create users).
//!
//! The revoked-keys file is either plain public keys, one per line, or an OpenSSH KRL
//! (`ssh-keygen -k`): explicit keys, SHA-256 fingerprints, and certificates by serial
//! (lists, ranges, bitmaps) or key id, per CA or for any CA. (KRL's SHA-1 fingerprint
//! section is not read: the key crate has no SHA-1; `ssh-keygen -k` writes SHA-256 when
//! asked with `hash:`, and plain keys or key blobs otherwise.)

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use berth_ssh::ssh_key::certificate::CertType;
use berth_ssh::ssh_key::public::KeyData;
use berth_ssh::ssh_key::{Fingerprint, HashAlg};
use berth_ssh::{Certificate, Net, PublicKey};

/// Certificates accepted and still in use, remembered for the re-check at every session
/// open; bounded (expired ones go first, then the oldest).
const MAX_REMEMBERED: usize = 10_000;

pub struct Certs {
    cas_path: Option<PathBuf>,
    revoked_path: Option<PathBuf>,
    /// What the files held when last read, and their stamps; read again when a file
    /// changes, as sshd reads them at every authentication.
    loaded: RwLock<Loaded>,
    accepted: Mutex<HashMap<(String, Fingerprint), Arc<Certificate>>>,
}

#[derive(Default)]
struct Loaded {
    cas: Vec<Fingerprint>,
    revoked: Revoked,
    stamps: [Option<(SystemTime, u64)>; 2],
}

/// Why a certificate was refused (for the log; the client sees a plain refusal).
pub type Refusal = &'static str;

fn stamp(p: Option<&Path>) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p?).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Certs {
    /// Reads the CA keys and the revoked keys, either of them optional. Errors name the
    /// file and line.
    pub fn load(cas: Option<&Path>, revoked: Option<&Path>) -> Result<Self, String> {
        let certs = Self {
            cas_path: cas.map(Path::to_owned),
            revoked_path: revoked.map(Path::to_owned),
            loaded: RwLock::new(Loaded::default()),
            accepted: Mutex::new(HashMap::new()),
        };
        let loaded = certs.read()?;
        if let Ok(mut l) = certs.loaded.write() {
            *l = loaded;
        }
        Ok(certs)
    }

    fn read(&self) -> Result<Loaded, String> {
        // Stamps first: a change while reading is seen at the next refresh.
        let stamps = [
            stamp(self.cas_path.as_deref()),
            stamp(self.revoked_path.as_deref()),
        ];
        Ok(Loaded {
            cas: match &self.cas_path {
                Some(p) => Self::load_cas(p)?,
                None => Vec::new(),
            },
            revoked: match &self.revoked_path {
                Some(p) => Revoked::load(p)?,
                None => Revoked::default(),
            },
            stamps,
        })
    }

    /// Reads the files again if they changed since; a file that became unreadable or
    /// invalid keeps what was read before (and says so in the log).
    fn refresh(&self) {
        let now = [
            stamp(self.cas_path.as_deref()),
            stamp(self.revoked_path.as_deref()),
        ];
        if self.loaded.read().is_ok_and(|l| l.stamps == now) {
            return;
        }
        match self.read() {
            Ok(new) => {
                if let Ok(mut l) = self.loaded.write() {
                    *l = new;
                }
                tracing::info!("trusted CA keys or revoked keys read again");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read trusted CA keys or revoked keys; keeping the previous ones");
                if let Ok(mut l) = self.loaded.write() {
                    l.stamps = now;
                }
            }
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Loaded) -> T) -> Option<T> {
        self.refresh();
        self.loaded.read().ok().map(|l| f(&l))
    }

    /// Whether any CA is trusted (else no certificate can log in).
    pub fn any_ca(&self) -> bool {
        self.with(|l| !l.cas.is_empty()).unwrap_or(false)
    }

    fn load_cas(cas: &Path) -> Result<Vec<Fingerprint>, String> {
        let text = std::fs::read_to_string(cas)
            .map_err(|e| format!("cannot read trusted_user_ca_keys {}: {e}", cas.display()))?;
        let fps: Vec<Fingerprint> = public_keys(cas, &text)?
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect();
        if fps.is_empty() {
            return Err(format!("{} holds no CA key", cas.display()));
        }
        Ok(fps)
    }

    /// Revoked keys apply to plain keys too.
    pub fn key_revoked(&self, key: &KeyData) -> bool {
        self.with(|l| l.revoked.key(key)).unwrap_or(true)
    }

    /// Whether `cert` may log in as `user` from `peer` at `now` (seconds since the epoch).
    pub fn check(
        &self,
        user: &str,
        cert: &Certificate,
        peer: Option<IpAddr>,
        now: u64,
    ) -> Result<(), Refusal> {
        self.with(|l| l.check(user, cert, peer, now))
            .unwrap_or(Err("the CA keys cannot be read"))
    }

    /// Remembers an accepted certificate, so that later session opens on its connection
    /// can check it again ([`Certs::recheck`]).
    pub fn remember(&self, user: &str, cert: &Certificate, now: u64) {
        let Ok(mut map) = self.accepted.lock() else {
            return;
        };
        if map.len() >= MAX_REMEMBERED {
            map.retain(|_, c| c.valid_before() > now);
        }
        if map.len() >= MAX_REMEMBERED {
            let oldest = map
                .iter()
                .min_by_key(|(_, c)| c.valid_after())
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        let fp = cert.public_key().fingerprint(HashAlg::Sha256);
        map.insert((user.to_owned(), fp), Arc::new(cert.clone()));
    }

    /// Whether `key`, which a certificate logged in with as `user`, may still open
    /// sessions: the certificate is still valid and not revoked (the address was checked
    /// at login).
    pub fn recheck(&self, user: &str, key: &PublicKey, now: u64) -> bool {
        let fp = key.fingerprint(HashAlg::Sha256);
        let cert = self
            .accepted
            .lock()
            .ok()
            .and_then(|m| m.get(&(user.to_owned(), fp)).cloned());
        cert.is_some_and(|c| {
            self.with(|l| cert_still_valid(&c, now, &l.cas) && !l.revoked(&c))
                .unwrap_or(false)
        })
    }
}

impl Loaded {
    fn check(
        &self,
        user: &str,
        cert: &Certificate,
        peer: Option<IpAddr>,
        now: u64,
    ) -> Result<(), Refusal> {
        if cert.cert_type() != CertType::User {
            return Err("not a user certificate");
        }
        cert.validate_at(now, &self.cas)
            .map_err(|_| "not signed by a trusted CA, or not valid now")?;
        if !cert.valid_principals().iter().any(|p| p == user) {
            return Err("its principals do not name the user");
        }
        for (name, value) in cert.critical_options().iter() {
            if name != "source-address" {
                return Err("it has a critical option Berth does not know");
            }
            let allowed = value
                .split(',')
                .filter_map(|n| n.trim().parse::<Net>().ok())
                .collect::<Vec<_>>();
            if !peer.is_some_and(|ip| allowed.iter().any(|n| n.contains(ip))) {
                return Err("the client's address is not in its source-address");
            }
        }
        if self.revoked(cert) {
            return Err("it is revoked");
        }
        Ok(())
    }

    /// Its key, its CA's key, or the certificate itself (serial, key id) is revoked: the one
    /// test for a login and for the re-check at every later session open.
    fn revoked(&self, cert: &Certificate) -> bool {
        self.revoked.key(cert.public_key())
            || self.revoked.key(cert.signature_key())
            || self.revoked.certificate(cert)
    }
}

fn cert_still_valid(c: &Certificate, now: u64, cas: &[Fingerprint]) -> bool {
    c.validate_at(now, cas).is_ok()
}

/// What the revoked-keys file refuses.
#[derive(Default)]
pub struct Revoked {
    keys: HashSet<Vec<u8>>,
    sha256: HashSet<Vec<u8>>,
    certs: Vec<RevokedCerts>,
}

/// Certificates revoked by one CA (`ca: None`: by any CA), by serial range or key id.
struct RevokedCerts {
    ca: Option<Vec<u8>>,
    serials: Vec<(u64, u64)>,
    ids: HashSet<String>,
}

const KRL_MAGIC: &[u8] = b"SSHKRL\n\0";

impl Revoked {
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read revoked_keys {}: {e}", path.display()))?;
        if bytes.starts_with(KRL_MAGIC) {
            return Self::krl(&bytes)
                .map_err(|e| format!("{}: not a valid KRL ({e})", path.display()));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("{}: neither a KRL nor public keys", path.display()))?;
        let mut r = Self::default();
        for key in public_keys(path, &text)? {
            r.keys.insert(blob(key.key_data()));
        }
        Ok(r)
    }

    fn key(&self, key: &KeyData) -> bool {
        self.keys.contains(&blob(key))
            || self
                .sha256
                .contains(key.fingerprint(HashAlg::Sha256).as_bytes())
    }

    fn certificate(&self, cert: &Certificate) -> bool {
        let ca = blob(cert.signature_key());
        self.certs.iter().any(|r| {
            r.ca.as_ref().is_none_or(|c| *c == ca)
                && (r
                    .serials
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&cert.serial()))
                    || r.ids.contains(cert.key_id()))
        })
    }

    /// An OpenSSH key revocation list (PROTOCOL.krl).
    fn krl(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut r = Reader(bytes.get(KRL_MAGIC.len()..).unwrap_or_default());
        if r.u32()? != 1 {
            return Err("unknown format version");
        }
        let (_version, _date, _flags) = (r.u64()?, r.u64()?, r.u64()?);
        let (_reserved, _comment) = (r.string()?, r.string()?);
        let mut out = Self::default();
        while !r.0.is_empty() {
            let kind = r.u8()?;
            let mut data = Reader(r.string()?);
            match kind {
                // Certificates.
                1 => {
                    let ca = data.string()?;
                    let _reserved = data.string()?;
                    let (mut serials, mut ids) = (Vec::new(), HashSet::new());
                    while !data.0.is_empty() {
                        let sub = data.u8()?;
                        let mut s = Reader(data.string()?);
                        match sub {
                            0x20 => {
                                while !s.0.is_empty() {
                                    let n = s.u64()?;
                                    serials.push((n, n));
                                }
                            }
                            0x21 => serials.push((s.u64()?, s.u64()?)),
                            0x22 => {
                                let offset = s.u64()?;
                                let bitmap = s.string()?;
                                let bits = bitmap.len().saturating_mul(8);
                                for i in 0..bits {
                                    let byte =
                                        bitmap.get(bitmap.len() - 1 - i / 8).copied().unwrap_or(0);
                                    if byte & (1 << (i % 8)) != 0 {
                                        let n = offset.saturating_add(i as u64);
                                        serials.push((n, n));
                                    }
                                }
                            }
                            0x23 => {
                                while !s.0.is_empty() {
                                    ids.insert(String::from_utf8_lossy(s.string()?).into_owned());
                                }
                            }
                            _ => return Err("unknown certificate section"),
                        }
                    }
                    let ca = (!ca.is_empty()).then(|| ca.to_vec());
                    out.certs.push(RevokedCerts { ca, serials, ids });
                }
                // Explicit keys.
                2 => {
                    while !data.0.is_empty() {
                        out.keys.insert(data.string()?.to_vec());
                    }
                }
                // SHA-256 fingerprints.
                5 => {
                    while !data.0.is_empty() {
                        out.sha256.insert(data.string()?.to_vec());
                    }
                }
                // SHA-1 fingerprints (not readable here) and the signature: skipped.
                3 | 4 => {}
                _ => return Err("unknown section"),
            }
        }
        Ok(out)
    }
}

/// The public keys of `text` (the file at `path`), one per line, blank lines and `#`
/// comments skipped; an error names the file and line.
fn public_keys(path: &Path, text: &str) -> Result<Vec<PublicKey>, String> {
    text.lines()
        .enumerate()
        .map(|(n, line)| (n, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| {
            PublicKey::from_openssh(line)
                .map_err(|e| format!("{} line {}: not a public key ({e})", path.display(), n + 1))
        })
        .collect()
}

/// A key's wire encoding (what KRLs list).
fn blob(key: &KeyData) -> Vec<u8> {
    use berth_ssh::ssh_encoding::Encode;
    let mut out = Vec::new();
    let _ = key.encode(&mut out);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let (head, rest) = self.0.split_at_checked(n).ok_or("truncated")?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| "truncated")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| "truncated")?,
        ))
    }
    fn string(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(self.u32()?).map_err(|_| "truncated")?;
        self.take(n)
    }
}
