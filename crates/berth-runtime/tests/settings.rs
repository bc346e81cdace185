#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! A container's per-user settings on the real engine (issue 16): the GPU device request
//! reaches its configuration (the engine takes it at create, even without the NVIDIA
//! runtime; only a start would need it), memory and CPUs change under it, and
//! [`Runtime::applied`] reads all of it back.

use std::collections::HashMap;
use std::path::PathBuf;

use berth_runtime::{
    BindMount, ContainerSpec, DockerRuntime, GpuRequest, Limits, Runtime, RuntimeError,
};
use berth_testkit::{BUSYBOX, docker, ensure_images};

/// Removes the container when dropped, whatever the test did.
struct Remove(String);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.0])
            .output();
    }
}

fn spec(name: &str, guest: PathBuf, gpus: Option<GpuRequest>, shared: PathBuf) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: BUSYBOX.to_owned(),
        hostname: "t".into(),
        labels: HashMap::from([("berth.test".to_owned(), "settings".to_owned())]),
        guest_dir: guest,
        limits: Limits {
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(1_000_000_000),
            pids: 100,
            log_bytes: None,
            disk_bytes: None,
        },
        network: "none".into(),
        mounts: vec![BindMount {
            source: shared,
            target: "/datasets".into(),
            read_only: true,
        }],
        gpus,
    }
}

#[tokio::test]
async fn gpu_requests_limits_and_mounts_reach_the_container_and_read_back() {
    ensure_images();
    let rt = DockerRuntime::connect("/var/run/docker.sock".into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    for (n, gpus, want) in [
        (
            0,
            Some(GpuRequest::All),
            r#"[{"Driver":"nvidia","Count":-1,"DeviceIDs":null,"Capabilities":[["gpu"]],"Options":null}]"#,
        ),
        (
            1,
            Some(GpuRequest::Devices(vec!["0".into(), "2".into()])),
            r#"[{"Driver":"nvidia","Count":0,"DeviceIDs":["0","2"],"Capabilities":[["gpu"]],"Options":null}]"#,
        ),
        (2, None, "null"),
    ] {
        let name = format!("berth-settings-test-{}-{n}", std::process::id());
        let _rm = Remove(name.clone());
        let id = rt
            .create(&spec(
                &name,
                dir.path().to_owned(),
                gpus.clone(),
                shared.clone(),
            ))
            .await
            .unwrap();
        let requests = docker(&[
            "inspect",
            "-f",
            "{{json .HostConfig.DeviceRequests}}",
            &name,
        ]);
        assert_eq!(requests.trim(), want);
        let applied = rt.applied(&name).await.unwrap().unwrap();
        assert_eq!(applied.gpus, gpus);
        assert_eq!(applied.pids, Some(100));
        assert_eq!(applied.memory_bytes, Some(64 << 20));
        assert_eq!(
            applied.mounts,
            [BindMount {
                source: shared.clone(),
                target: "/datasets".into(),
                read_only: true,
            }]
        );
        // Memory and CPUs change in place; `None` leaves one as it is.
        rt.update_limits(&id, Some(128 << 20), None).await.unwrap();
        let applied = rt.applied(&name).await.unwrap().unwrap();
        assert_eq!(applied.memory_bytes, Some(128 << 20));
        assert_eq!(applied.nano_cpus, Some(1_000_000_000));
        rt.update_limits(&id, None, Some(1_500_000_000))
            .await
            .unwrap();
        let h = docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.NanoCpus}}",
            &name,
        ]);
        assert_eq!(h.trim(), format!("{} {} 1500000000", 128 << 20, 128 << 20));
        if n == 0 {
            // Without the runtime the engine refuses to start it: what the lifecycle
            // spares a user by refusing before the create.
            if matches!(
                rt.gpu_support().await.unwrap(),
                berth_runtime::GpuSupport::NotAvailable
            ) {
                let e = rt.start(&id).await.unwrap_err();
                assert!(matches!(e, RuntimeError::Docker(_)), "{e}");
            } else {
                println!("skipped: the engine has the NVIDIA runtime; no refusal to see");
            }
        }
    }
    assert!(
        rt.applied("berth-settings-test-none")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        rt.data_root().await.unwrap(),
        PathBuf::from(docker(&["info", "-f", "{{.DockerRootDir}}"]).trim())
    );
}
