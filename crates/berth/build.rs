//! Lays out the release executable's code by use: the functions that run when the daemon
//! starts, then those of a login (recorded by `scripts/order-code` into `code-order.txt`),
//! first and together. The kernel maps the code of a file 64 KiB around each page touched, so
//! code that runs scattered over the whole executable (each crate's functions across its
//! codegen units, generics where they are used) kept ~12 MiB of it mapped in a daemon at
//! rest; together it is a few MiB (docs/benchmarks.md, issue 18).
//!
//! Only where the linker is known to be rustc's own lld (x86_64 Linux, no linker chosen by
//! the user): another linker may not know `--symbol-ordering-file`. Names the file holds that
//! a build no longer has are skipped, so a stale file costs locality, never a build.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=code-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let target = var("TARGET");
    let own_linker = !var("RUSTC_LINKER").is_empty()
        || env::vars().any(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER"))
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if target != "x86_64-unknown-linux-gnu" || var("PROFILE") != "release" || own_linker {
        return;
    }
    let order = format!("{}/code-order.txt", var("CARGO_MANIFEST_DIR"));
    println!("cargo:rustc-link-arg-bin=berth=-Wl,--symbol-ordering-file={order}");
    println!("cargo:rustc-link-arg-bin=berth=-Wl,--no-warn-symbol-ordering");
}
