//! Object stores in a build without the `cloud` feature: every object-store URL is still
//! recognised, and opening one is a clear error instead of "no such file".

use std::io::{Read, Write};

pub use crate::location::{
    configure, is_cloud_url, scheme_of, settings, ClientSettings, CloudKind,
};
use crate::store::{ObjectMeta, StagedWrite, Store, StoreError};

/// An object-store location; none can exist in this build.
#[derive(Debug, Clone)]
pub enum CloudStore {}

impl CloudStore {
    /// Always [`StoreError::NoCloudSupport`].
    pub fn open(url: &str) -> Result<CloudStore, StoreError> {
        Err(StoreError::NoCloudSupport(url.to_string()))
    }

    /// Always [`StoreError::NoCloudSupport`].
    pub fn open_object(url: &str) -> Result<(CloudStore, String), StoreError> {
        Err(StoreError::NoCloudSupport(url.to_string()))
    }

    /// Unreachable: no value exists.
    pub fn with_part_size(self, _part_size: usize) -> CloudStore {
        match self {}
    }
}

impl Store for CloudStore {
    fn root_uri(&self) -> String {
        match *self {}
    }
    fn uri_of(&self, _path: &str) -> String {
        match *self {}
    }
    fn open_read(&self, _path: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        match *self {}
    }
    fn stat(&self, _path: &str) -> Result<Option<ObjectMeta>, StoreError> {
        match *self {}
    }
    fn list(&self, _dir: &str) -> Result<Vec<String>, StoreError> {
        match *self {}
    }
    fn put(&self, _path: &str, _data: &[u8]) -> Result<(), StoreError> {
        match *self {}
    }
    fn put_if_absent(&self, _path: &str, _data: &[u8]) -> Result<bool, StoreError> {
        match *self {}
    }
    fn delete(&self, _path: &str) -> Result<(), StoreError> {
        match *self {}
    }
    fn create_staged(&self, _path: &str) -> Result<Box<dyn StagedWrite>, StoreError> {
        match *self {}
    }
    fn discard_abandoned_staged(&self, _path: &str) -> Result<usize, StoreError> {
        match *self {}
    }
    fn download_to(
        &self,
        _path: &str,
        _out: &mut dyn Write,
        _progress: &dyn Fn(u64),
    ) -> Result<u64, StoreError> {
        match *self {}
    }
}
