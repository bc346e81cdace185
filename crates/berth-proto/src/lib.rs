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

pub use api::{
    AddKeysRequest, AddUserRequest, ApiError, ContainerInfo, ContainerState, ForwardingInfo,
    HealthInfo, ImageInfo, KeyInfo, RemovedKeys, SessionInfo, SetForwardingRequest, StatusInfo,
    Switch, UserInfo,
};
pub use client::{AdminClient, ClientError};
pub use key::{AuthorizedKey, KeyError, fingerprint, parse_authorized_keys};
pub use name::{ImageName, NameError, UserName, full_image_name};
pub use ssh_key::PublicKey;

/// The admin socket's file name inside the state directory.
pub const ADMIN_SOCKET: &str = "admin.sock";
