//! Lays out the release executable's code by use: the functions that run when the daemon
//! starts, then those of a login (recorded by `scripts/order-code` into `code-order.txt`),
//! first and together. The kernel maps the code of a file 64 KiB around each page touched, so
//! code that runs scattered over the whole executable (each crate's functions across its
//! codegen units, generics where they are used) kept ~12 MiB of it mapped in a daemon at
//! rest; together it is a few MiB (docs/benchmarks.md, issue 18).
//!
//! Relative relocations are packed too (`-z pack-relative-relocs`): the loader reads all of
//! them at start, and unpacked they were 580 KiB of the executable.
//!
//! Only where the linker is rustc's own lld: x86_64 Linux, Rust 1.90 or later (its default
//! there), the toolchain ships it, and no linker or linker flavour is chosen by the user.
//! GNU ld does not know `--symbol-ordering-file`. Names the file holds that a build does not
//! have are skipped, so a stale file costs locality, never a build. The release profile has
//! one code unit per crate (Cargo.toml) so that the names hold from one edit to the next:
//! with several, ThinLTO renamed functions it shared between units `name.llvm.<hash of the
//! unit>`, and any edit of a crate changed those.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=code-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let target = var("TARGET");
    if target != "x86_64-unknown-linux-gnu" || var("PROFILE") != "release" {
        return;
    }
    // Cargo sets RUSTC_LINKER for build scripts when a linker is configured for the target.
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let chosen = ["linker", "link-self-contained", "fuse-ld"];
    if env::var_os("RUSTC_LINKER").is_some() || chosen.iter().any(|c| flags.contains(c)) {
        return;
    }
    if !rustc_links_with_lld(&target) {
        return;
    }
    let order = concat!(env!("CARGO_MANIFEST_DIR"), "/code-order.txt");
    // `-Wl,` splits at commas.
    if order.contains(',') {
        return;
    }
    println!("cargo:rustc-link-arg-bin=berth=-Wl,--symbol-ordering-file={order}");
    println!("cargo:rustc-link-arg-bin=berth=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR, glibc 2.36+): the loader reads ~10 KiB of them
    // at start instead of 580 KiB.
    println!("cargo:rustc-link-arg-bin=berth=-Wl,-z,pack-relative-relocs");
}

/// Rust 1.90 and later link x86_64 Linux with the lld they ship (`gcc-ld/ld.lld` in the
/// sysroot); a toolchain built without it (some distributions') uses the system's ld.
fn rustc_links_with_lld(target: &str) -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = |arg: &str| {
        Command::new(&rustc)
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let minor = out("-vV")
        .lines()
        .find_map(|l| l.strip_prefix("release: 1."))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    let sysroot = out("--print=sysroot");
    let lld = Path::new(sysroot.trim()).join(format!("lib/rustlib/{target}/bin/gcc-ld/ld.lld"));
    minor.is_some_and(|m| m >= 90) && lld.exists()
}
