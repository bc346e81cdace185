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
        volumes: vec![],
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

/// Removes the volume when dropped, whatever the test did.
struct RemoveVolume(String);

impl Drop for RemoveVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

#[tokio::test]
async fn a_home_volume_gets_the_images_content_and_its_size_is_measured() {
    ensure_images();
    let rt = DockerRuntime::connect("/var/run/docker.sock".into())
        .await
        .unwrap();
    // Root's home, from the images' own /etc/passwd.
    assert_eq!(
        rt.root_home(BUSYBOX).await.unwrap().as_deref(),
        Some("/root")
    );
    assert_eq!(
        rt.root_home(berth_testkit::DEBIAN)
            .await
            .unwrap()
            .as_deref(),
        Some("/root")
    );
    assert!(matches!(
        rt.root_home("berth-test/nonexistent:x").await,
        Err(RuntimeError::ImageNotFound(_))
    ));
    // Each probe goes with its call. Other test binaries running beside this one make their
    // own for a moment, so one seen here must also still be there 20 s later to be a leak.
    let probes = || docker(&["ps", "-aq", "--filter", "label=berth.probe"]);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut left = probes();
    while !left.trim().is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(200));
        left = probes();
    }
    assert!(left.trim().is_empty(), "probe containers left: {left}");

    let tag = format!("berth-home-test-{}", std::process::id());
    let _v = RemoveVolume(tag.clone());
    let labels = HashMap::from([("berth.test".to_owned(), tag.clone())]);
    let spec = berth_runtime::VolumeSpec {
        name: tag.clone(),
        labels: labels.clone(),
        // Refused on most file systems (not xfs with pquota): made without it.
        size_bytes: Some(64 << 20),
    };
    assert_eq!(rt.ensure_volume(&spec).await.unwrap(), labels);
    assert_eq!(rt.ensure_volume(&spec).await.unwrap(), labels);
    assert_eq!(rt.volume_labels(&tag).await.unwrap(), Some(labels));
    // Made from debian, whose /root has .bashrc: an empty volume gets it at the first mount.
    let guest = tempfile::tempdir().unwrap();
    let mut s = spec_for_home(&tag, guest.path().to_owned());
    s.volumes = vec![berth_runtime::VolumeMount {
        name: tag.clone(),
        target: "/root".into(),
    }];
    let _c = Remove(tag.clone());
    rt.create(&s).await.unwrap();
    assert_eq!(rt.applied(&tag).await.unwrap().unwrap().volumes, s.volumes);
    let out = docker(&[
        "run",
        "--rm",
        "-v",
        &format!("{tag}:/h"),
        BUSYBOX,
        "ls",
        "-a",
        "/h",
    ]);
    assert!(out.contains(".bashrc"), "{out}");
    let usage = rt.disk_usage("berth.test", &tag).await.unwrap();
    assert_eq!(usage.volumes.len(), 1, "{usage:?}");
    assert!(usage.volumes[0].bytes > 0, "{usage:?}");
    assert_eq!(usage.containers.len(), 1, "{usage:?}");
    assert!(!usage.images.is_empty());
    // The engine runs one `system df` at a time and refuses the others; asked at once, each
    // still gets its answer.
    let all =
        futures_util::future::join_all((0..6).map(|_| rt.disk_usage("berth.test", &tag))).await;
    for u in all {
        assert_eq!(u.unwrap().volumes.len(), 1);
    }
    // In use: refused; then gone, and a second remove finds none.
    assert!(rt.remove_volume(&tag).await.is_err());
    rt.remove(&tag).await.unwrap();
    assert!(rt.remove_volume(&tag).await.unwrap());
    assert!(!rt.remove_volume(&tag).await.unwrap());
    assert_eq!(rt.volume_labels(&tag).await.unwrap(), None);
}

fn spec_for_home(name: &str, guest: PathBuf) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: berth_testkit::DEBIAN.to_owned(),
        hostname: "t".into(),
        labels: HashMap::from([("berth.test".to_owned(), name.to_owned())]),
        guest_dir: guest,
        limits: Limits {
            memory_bytes: None,
            nano_cpus: None,
            pids: 100,
            log_bytes: None,
            disk_bytes: None,
        },
        network: "none".into(),
        mounts: vec![],
        gpus: None,
        volumes: vec![],
    }
}
