//! The algorithms the door offers. Berth's port faces the internet, so the defaults are the
//! modern ones only: key exchange by ML-KEM/X25519 or X25519 (no finite-field
//! Diffie-Hellman: a client could pick group18, send a trivial value and cost the server
//! two 8192-bit exponentiations per attempt), AEAD ciphers or CTR, and encrypt-then-MAC
//! SHA-2 MACs. Admins who must let an old client in widen the lists in `berth.toml`; a
//! name russh does not implement is refused with the list of those it does.

use std::borrow::Cow;

use russh::{Preferred, cipher, kex, mac};

/// `kex_algorithms` by default (the ext-info and strict-kex markers are always added).
pub const DEFAULT_KEX: &[&str] = &[
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
];

/// `ciphers` by default.
pub const DEFAULT_CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
];

/// `macs` by default (used with the CTR ciphers; AEAD ciphers carry their own).
pub const DEFAULT_MACS: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
];

/// Key exchange, cipher and MAC lists, checked against what russh implements.
#[derive(Debug, Clone, PartialEq)]
pub struct Algorithms {
    kex: Vec<kex::Name>,
    cipher: Vec<cipher::Name>,
    mac: Vec<mac::Name>,
}

impl Default for Algorithms {
    fn default() -> Self {
        let owned = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // The defaults are names russh implements (a unit test checks).
        Self::parse(
            &owned(DEFAULT_KEX),
            &owned(DEFAULT_CIPHERS),
            &owned(DEFAULT_MACS),
        )
        .unwrap_or(Self {
            kex: vec![kex::CURVE25519],
            cipher: vec![cipher::CHACHA20_POLY1305],
            mac: vec![mac::HMAC_SHA256_ETM],
        })
    }
}

impl Algorithms {
    /// Checks each list; the error names the setting, the name and what is available.
    pub fn parse(kexes: &[String], ciphers: &[String], macs: &[String]) -> Result<Self, String> {
        Ok(Self {
            kex: names("kex_algorithms", kexes, kex_names(), |s| {
                kex::Name::try_from(s).ok()
            })?,
            cipher: names("ciphers", ciphers, cipher_names(), |s| {
                cipher::Name::try_from(s).ok()
            })?,
            mac: names("macs", macs, mac_names(), |s| mac::Name::try_from(s).ok())?,
        })
    }

    /// russh's preference lists for a server with these algorithms.
    pub(crate) fn preferred(&self) -> Preferred {
        let mut kex = self.kex.clone();
        kex.push(kex::EXTENSION_SUPPORT_AS_SERVER);
        kex.push(kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER);
        Preferred {
            kex: Cow::Owned(kex),
            cipher: Cow::Owned(self.cipher.clone()),
            mac: Cow::Owned(self.mac.clone()),
            compression: Cow::Borrowed(COMPRESSION),
            ..Preferred::DEFAULT
        }
    }
}

/// Compression: none, or `zlib@openssh.com`, which starts only once the client is
/// authenticated (as OpenSSH's server offers it). RFC 4253's `zlib` starts at the first
/// NEWKEYS, so every packet of a client nobody knows yet would be inflated, up to 256 KiB
/// from a few hundred bytes, before its type is even looked at.
const COMPRESSION: &[russh::compression::Name] =
    &[russh::compression::NONE, russh::compression::ZLIB_LEGACY];

fn kex_names() -> Vec<String> {
    [
        kex::MLKEM768X25519_SHA256,
        kex::CURVE25519,
        kex::CURVE25519_PRE_RFC_8731,
        kex::DH_GEX_SHA256,
        kex::DH_G18_SHA512,
        kex::DH_G17_SHA512,
        kex::DH_G16_SHA512,
        kex::DH_G15_SHA512,
        kex::DH_G14_SHA256,
        kex::DH_G14_SHA1,
        kex::DH_GEX_SHA1,
        kex::DH_G1_SHA1,
        kex::ECDH_SHA2_NISTP256,
        kex::ECDH_SHA2_NISTP384,
        kex::ECDH_SHA2_NISTP521,
    ]
    .iter()
    .filter(|n| kex::Name::try_from(n.as_ref()).is_ok())
    .map(|n| n.as_ref().to_owned())
    .collect()
}

fn cipher_names() -> Vec<String> {
    [
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::AES_256_CTR,
        cipher::AES_192_CTR,
        cipher::AES_128_CTR,
        cipher::AES_256_CBC,
        cipher::AES_192_CBC,
        cipher::AES_128_CBC,
    ]
    .iter()
    .filter(|n| cipher::Name::try_from(n.as_ref()).is_ok())
    .map(|n| n.as_ref().to_owned())
    .collect()
}

fn mac_names() -> Vec<String> {
    mac::ALL_MAC_ALGORITHMS
        .iter()
        .map(|n| n.as_ref().to_owned())
        .filter(|n| n != "none")
        .collect()
}

fn names<N>(
    setting: &str,
    given: &[String],
    known: Vec<String>,
    parse: impl Fn(&str) -> Option<N>,
) -> Result<Vec<N>, String> {
    if given.is_empty() {
        return Err(format!(
            "{setting} is empty; name at least one of: {}",
            known.join(", ")
        ));
    }
    given
        .iter()
        .map(|s| {
            // "none" would turn encryption or integrity off: never offered.
            let usable = known.contains(s);
            usable.then(|| parse(s)).flatten().ok_or_else(|| {
                format!(
                    "{setting}: {s:?} is not an algorithm Berth implements; choose from: {}",
                    known.join(", ")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn owned(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_defaults_are_implemented_and_modern() {
        let a = Algorithms::parse(
            &owned(DEFAULT_KEX),
            &owned(DEFAULT_CIPHERS),
            &owned(DEFAULT_MACS),
        )
        .unwrap();
        assert_eq!(a, Algorithms::default());
        let p = a.preferred();
        assert!(
            !p.kex
                .iter()
                .any(|k| k.as_ref().starts_with("diffie-hellman"))
        );
        assert!(p.kex.contains(&kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER));
        assert!(
            p.mac
                .iter()
                .all(|m| m.as_ref().ends_with("-etm@openssh.com"))
        );
    }

    #[test]
    fn unknown_and_none_are_refused_by_name() {
        let err = Algorithms::parse(
            &owned(&["curve25519-sha256", "sntrup-foo"]),
            &owned(DEFAULT_CIPHERS),
            &owned(DEFAULT_MACS),
        )
        .unwrap_err();
        assert!(
            err.starts_with("kex_algorithms: \"sntrup-foo\" is not an algorithm"),
            "{err}"
        );
        assert!(err.contains("curve25519-sha256"), "{err}");
        let err = Algorithms::parse(&owned(DEFAULT_KEX), &owned(&["none"]), &owned(DEFAULT_MACS))
            .unwrap_err();
        assert!(err.starts_with("ciphers: \"none\""), "{err}");
        let err = Algorithms::parse(&owned(DEFAULT_KEX), &owned(DEFAULT_CIPHERS), &[]).unwrap_err();
        assert!(err.starts_with("macs is empty"), "{err}");
        // An old client's group can be allowed on purpose.
        let mut kex = owned(DEFAULT_KEX);
        kex.push("diffie-hellman-group14-sha256".into());
        Algorithms::parse(&kex, &owned(DEFAULT_CIPHERS), &owned(DEFAULT_MACS)).unwrap();
    }
}
