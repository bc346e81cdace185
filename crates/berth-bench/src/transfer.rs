//! Throughput: one file of random bytes sent up by `scp` (SFTP) and by `ssh 'cat
//! >/dev/null'`, into a container on Berth and into the host on OpenSSH. Rounds alternate
//! their order; written files are removed and flushed (`sync`) outside the timed part.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Result;

use crate::client::{Endpoint, timed};
use crate::figure::Figure;
use crate::interrupt;
use crate::rig::Rig;

const MIB: f64 = 1024.0 * 1024.0;

/// Writes `mib` MiB of pseudo-random bytes (xorshift: incompressible, and fast to make).
fn make_file(path: &Path, mib: u64) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&block)?;
    }
    w.flush()?;
    Ok(())
}

fn sync() {
    let _ = Command::new("sync").status();
}

struct Case<'a> {
    figure: usize,
    berth: bool,
    run: Box<dyn Fn() -> Result<f64> + 'a>,
}

pub fn throughput(rig: &Rig, mib: u64, rounds: usize) -> Vec<Figure> {
    let size = if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    };
    let figures = vec![
        Figure::new(
            "scp_busybox",
            format!("scp up {size}: busybox container (Berth's sftp-server) vs the host"),
            "MiB/s",
            "OpenSSH",
        )
        .higher_is_better(),
        Figure::new(
            "scp_debian",
            format!("scp up {size}: Debian container (its sftp-server) vs the host"),
            "MiB/s",
            "OpenSSH",
        )
        .higher_is_better(),
        Figure::new(
            "ssh_cat",
            format!("`ssh 'cat >/dev/null' < {size}`: busybox container vs the host"),
            "MiB/s",
            "OpenSSH",
        )
        .higher_is_better(),
    ];
    let data = rig.path("data.bin");
    if let Err(e) = make_file(&data, mib) {
        return figures.into_iter().map(|f| f.failed(&e)).collect();
    }
    let bytes = mib as f64 * MIB;
    let rate = |secs: f64| bytes / MIB / secs;
    let host_dst = rig.path("received.bin");

    let scp_berth = |e: &'static str| {
        let data = data.clone();
        move |ep: &Endpoint| -> Result<f64> {
            let t = timed(&mut ep.scp_to(&data, e))?;
            ep.run(&format!("rm -f {e}"))?;
            sync();
            Ok(rate(t.as_secs_f64()))
        }
    };
    let scp_into_container = scp_berth("/root/bench.bin");
    let cases: Vec<Case<'_>> = vec![
        Case {
            figure: 0,
            berth: true,
            run: Box::new(|| scp_into_container(&rig.alice)),
        },
        Case {
            figure: 0,
            berth: false,
            run: Box::new(|| {
                let t = timed(&mut rig.root.scp_to(&data, &host_dst.to_string_lossy()))?;
                std::fs::remove_file(&host_dst)?;
                sync();
                Ok(rate(t.as_secs_f64()))
            }),
        },
        Case {
            figure: 1,
            berth: true,
            run: Box::new(|| scp_into_container(&rig.bob)),
        },
        Case {
            figure: 2,
            berth: true,
            run: Box::new(|| cat(&rig.alice, &data).map(&rate)),
        },
        Case {
            figure: 2,
            berth: false,
            run: Box::new(|| cat(&rig.root, &data).map(&rate)),
        },
    ];

    // samples[figure] = (berth, openssh)
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 3];
    let mut order: Vec<&Case<'_>> = cases.iter().collect();
    let outcome = (|| -> Result<()> {
        for round in 0..rounds {
            for case in &order {
                interrupt::check()?;
                let v = (case.run)()?;
                if let Some(s) = samples.get_mut(case.figure) {
                    if case.berth { s.0.push(v) } else { s.1.push(v) }
                }
            }
            eprintln!("  transfer round {}/{rounds} done", round + 1);
            order.reverse();
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&data);
    // The Debian figure shares the host's scp samples as its baseline.
    let host_scp = samples.first().map(|s| s.1.clone()).unwrap_or_default();
    if let Some(s) = samples.get_mut(1) {
        s.1 = host_scp;
    }
    let err = outcome.as_ref().err().map(|e| format!("{e:#}"));
    figures
        .into_iter()
        .zip(samples)
        .map(|(f, (b, o))| {
            let r = match &err {
                Some(e) => Err(anyhow::anyhow!("{e}")),
                None => Ok(()),
            };
            f.with(b, o, r)
        })
        .collect()
}

/// `ssh HOST 'cat >/dev/null' < FILE`; returns seconds.
fn cat(ep: &Endpoint, data: &Path) -> Result<f64> {
    let t = timed(
        ep.ssh(&[])
            .arg("cat >/dev/null")
            .stdin(Stdio::from(File::open(data)?)),
    )?;
    Ok(t.as_secs_f64())
}
