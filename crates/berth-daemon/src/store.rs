//! The store as async code uses it: every call runs on a blocking thread (SQLite waits on
//! the disk and on its lock), so no runtime worker ever does. The one way the daemon's async
//! code reaches [`berth_store::Store`].

use berth_proto::{AuthorizedKey, ImageName, KeyInfo, UserName};
use berth_store::{Store, StoreError, UserRecord};

#[derive(Clone)]
pub struct AsyncStore(Store);

impl AsyncStore {
    pub fn new(store: Store) -> Self {
        Self(store)
    }

    /// Runs `f` with the store on a blocking thread: for several calls that belong together.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or(Err(StoreError::Poisoned))
    }

    pub async fn user(&self, name: &UserName) -> Result<UserRecord, StoreError> {
        let name = name.clone();
        self.run(move |s| s.user(&name)).await
    }

    /// Whether user `name` exists (a store failure counts as no).
    pub async fn exists(&self, name: &UserName) -> bool {
        self.user(name).await.is_ok()
    }

    pub async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.run(|s| s.users()).await
    }

    pub async fn add_user(
        &self,
        name: &UserName,
        image: &ImageName,
        keys: Vec<AuthorizedKey>,
    ) -> Result<UserRecord, StoreError> {
        let (name, image) = (name.clone(), image.clone());
        self.run(move |s| s.add_user(&name, &image, &keys)).await
    }

    pub async fn remove_user(&self, name: &UserName) -> Result<(), StoreError> {
        let name = name.clone();
        self.run(move |s| s.remove_user(&name)).await
    }

    pub async fn set_committed_image(
        &self,
        name: &UserName,
        image: Option<ImageName>,
    ) -> Result<(), StoreError> {
        let name = name.clone();
        self.run(move |s| s.set_committed_image(&name, image.as_ref()))
            .await
    }

    pub async fn settings(&self, name: &UserName) -> Result<berth_store::UserSettings, StoreError> {
        let name = name.clone();
        self.run(move |s| s.settings(&name)).await
    }

    pub async fn keys(&self, name: &UserName) -> Result<Vec<KeyInfo>, StoreError> {
        let name = name.clone();
        self.run(move |s| s.keys(&name)).await
    }

    pub async fn key_authorized(&self, name: &str, fingerprint: &str) -> Result<bool, StoreError> {
        let (name, fp) = (name.to_owned(), fingerprint.to_owned());
        self.run(move |s| s.key_authorized(&name, &fp)).await
    }
}
