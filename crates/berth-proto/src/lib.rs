//! Berth's shared vocabulary: validated domain types, the admin API's request and response
//! types, and the client the CLI uses to reach the admin socket.
//!
//! This crate does no server-side I/O. Every type that crosses a boundary (CLI → daemon,
//! daemon → store) is validated when it is built, so the rest of the code can trust a
//! [`UserName`] or an [`AuthorizedKey`] without checking again.

mod api;
mod client;
mod key;
mod name;
pub mod settings;

pub use api::{
    AddKeysRequest, AddUserRequest, ApiError, ContainerInfo, ContainerState, DiskInfo, Effective,
    ForwardingInfo, HealthInfo, HomeInfo, ImageInfo, KeyInfo, KickedInfo, LimitsInfo, MountInfo,
    MountsInfo, RemovedKeys, SessionInfo, SetForwardingRequest, SetSettingsRequest, Source,
    StatusInfo, Switch, UserInfo,
};
pub use client::{AdminClient, ClientError};
pub use key::{AuthorizedKey, KeyError, fingerprint, parse_authorized_keys};
pub use name::{ImageName, NameError, UserName, full_image_name};
pub use ssh_key::PublicKey;

/// Berth's version. The workspace `Cargo.toml` is the one place that sets it; the Debian
/// package's version is made from it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the binary was built from, `HASH DATE` (`build.rs`; `unknown` when built outside
/// a git checkout without `BERTH_COMMIT`).
pub const COMMIT: &str = env!("BERTH_COMMIT");

/// `VERSION (COMMIT)`, e.g. `0.1.0 (1a2b3c4d5e6f 2026-11-29)`: what `berth --version`,
/// `berth status` and the daemon's start line show.
pub const VERSION_LONG: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BERTH_COMMIT"), ")");

/// The admin socket's file name inside the state directory.
pub const ADMIN_SOCKET: &str = "admin.sock";
