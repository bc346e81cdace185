//! The `berth-guest` helper is every container's PID 1, in any image: busybox and distroless
//! images have no dynamic loader, so a dynamically linked helper makes every container exit
//! at once ("exec /.berth/berth-guest: no such file or directory"), and in a Debian image the
//! same mistake shows up only later. The daemon refuses such a file at start and in
//! `--check`: it must be an executable, 64-bit Linux ELF of this host's architecture with no
//! program interpreter (statically linked, static-pie included).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};

/// What to run to get the right file, for every refusal.
const HOW: &str = "build the static helper with `scripts/build-guest --release` (it prints its path) \
and give it to `berth daemon --guest-binary FILE` or `guest_binary` in berth.toml";

#[cfg(target_arch = "x86_64")]
const HOST_MACHINE: (u16, &str) = (elf::EM_X86_64, "x86_64");
#[cfg(target_arch = "aarch64")]
const HOST_MACHINE: (u16, &str) = (elf::EM_AARCH64, "aarch64");

/// Why `bytes` (the file at `path`, with permission bits `mode`) cannot be the helper, as one
/// line naming the file and the fix; `None` when it can.
pub fn refusal(path: &Path, bytes: &[u8], mode: u32) -> Option<String> {
    let problem = problem(bytes, mode)?;
    Some(format!(
        "{} cannot be the berth-guest helper: {problem}; {HOW}",
        path.display()
    ))
}

/// Reads `path` and checks it; the error is one line naming the file and the fix.
pub fn check(path: &Path) -> Result<Vec<u8>, String> {
    let read = std::fs::read(path).and_then(|b| Ok((b, std::fs::metadata(path)?)));
    let (bytes, meta) = read.map_err(|e| {
        format!(
            "cannot read the berth-guest helper at {}: {e}; {HOW}",
            path.display()
        )
    })?;
    match refusal(path, &bytes, meta.permissions().mode()) {
        Some(why) => Err(why),
        None => Ok(bytes),
    }
}

fn problem(bytes: &[u8], mode: u32) -> Option<String> {
    if mode & 0o111 == 0 {
        return Some("it is not executable".into());
    }
    if object::FileKind::parse(bytes).ok() != Some(object::FileKind::Elf64) {
        return Some("it is not a 64-bit Linux ELF executable".into());
    }
    let Ok(header) = elf::FileHeader64::<object::Endianness>::parse(bytes) else {
        return Some("its ELF header cannot be read".into());
    };
    let Ok(endian) = header.endian() else {
        return Some("its ELF header cannot be read".into());
    };
    let (machine, arch) = HOST_MACHINE;
    if header.e_machine(endian) != machine {
        return Some(format!(
            "it is not built for this host's architecture ({arch})"
        ));
    }
    if !matches!(header.e_type(endian), elf::ET_EXEC | elf::ET_DYN) {
        return Some("it is not an executable (an object file or core dump?)".into());
    }
    let Ok(headers) = header.program_headers(endian, bytes) else {
        return Some("its program headers cannot be read".into());
    };
    let interp = headers
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_INTERP)?;
    let loader = interp
        .data(endian, bytes)
        .ok()
        .map(|d| {
            String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })
        .unwrap_or_default();
    Some(format!(
        "it is dynamically linked (it needs {loader}, which minimal images such as busybox do not have)"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_daemon_itself_is_refused_as_dynamically_linked() {
        // The test binary is built without crt-static: exactly the mistake of taking cargo's
        // plain `target/release/berth-guest`.
        let me = std::env::current_exe().unwrap();
        let why = check(&me).unwrap_err();
        assert!(why.contains("dynamically linked"), "{why}");
        assert!(why.contains(&me.display().to_string()), "{why}");
        assert!(why.contains("scripts/build-guest --release"), "{why}");
        assert!(!why.contains('\n'));
    }

    #[test]
    fn not_executable_not_elf_and_unreadable_are_refused() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let p = Path::new("/x/berth-guest");
        assert!(refusal(p, &me, 0o644).unwrap().contains("not executable"));
        assert!(
            refusal(p, b"#!/bin/sh\necho hi\n", 0o755)
                .unwrap()
                .contains("not a 64-bit Linux ELF")
        );
        assert!(
            check(Path::new("/nonexistent/berth-guest"))
                .unwrap_err()
                .starts_with("cannot read the berth-guest helper at /nonexistent/berth-guest")
        );
    }

    #[test]
    fn a_static_helper_is_accepted() {
        // scripts/test exports the static helper it built; the end-to-end tests run with it.
        let Some(path) = std::env::var_os("BERTH_GUEST_BIN") else {
            eprintln!("skipped: BERTH_GUEST_BIN is not set (scripts/test sets it)");
            return;
        };
        let path = Path::new(&path);
        let bytes = check(path).unwrap();
        // The same file for another architecture is refused.
        let mut other = bytes;
        let machine = if HOST_MACHINE.0 == elf::EM_X86_64 {
            elf::EM_AARCH64
        } else {
            elf::EM_X86_64
        };
        other.splice(18..20, machine.to_le_bytes());
        let why = refusal(path, &other, 0o755).unwrap();
        assert!(why.contains("architecture"), "{why}");
    }
}
