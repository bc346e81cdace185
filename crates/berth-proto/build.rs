//! Records the commit the binaries are built from, for `berth --version`, `berth status` and
//! the daemon's start line. Outside a git checkout (a source tarball) `BERTH_COMMIT`, when
//! set, names it; otherwise it is `unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=BERTH_COMMIT");
    // The build reruns when HEAD moves: HEAD itself, the branch it names, packed refs.
    if let Some(git_dir) = git(&dir, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        if let Some(reference) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&dir, &["rev-parse", "--git-common-dir"])
                .map(|c| dir.join(c))
                .unwrap_or_else(|| git_dir.clone());
            for base in [&git_dir, &common] {
                let r = base.join(&reference);
                if r.exists() {
                    println!("cargo:rerun-if-changed={}", r.display());
                }
            }
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
        }
    }
    let commit = std::env::var("BERTH_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            git(
                &dir,
                &["log", "-1", "--format=%h %cs", "--abbrev=12", "HEAD"],
            )
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BERTH_COMMIT={commit}");
}
