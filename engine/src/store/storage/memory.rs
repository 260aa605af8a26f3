//! An in-process backend with the same concurrency rules as the kube one, for unit tests
//! of everything above storage.

use super::{Backend, Precondition, StorageError, Stored, check_path};
use futures::future::{BoxFuture, FutureExt as _};
use parking_lot::Mutex;
use std::collections::BTreeMap;

#[derive(Default)]
pub struct Memory {
    inner: Mutex<(u64, BTreeMap<String, Stored>)>,
}

impl Memory {
    fn current(&self, path: &str) -> Result<Option<Stored>, StorageError> {
        check_path(path)?;
        Ok(self.inner.lock().1.get(path).cloned())
    }
}

fn holds(precondition: Precondition, current: Option<&Stored>) -> bool {
    match precondition {
        Precondition::None => true,
        Precondition::Absent => current.is_none(),
        Precondition::Version(v) => current.is_some_and(|c| c.version == v),
    }
}

impl Backend for Memory {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>> {
        std::future::ready(self.current(path)).boxed()
    }

    fn get_fresh<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>> {
        self.get(path)
    }

    fn put<'a>(
        &'a self,
        path: &'a str,
        value: Vec<u8>,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        let result = (|| {
            check_path(path)?;
            if value.len() > super::MAX_VALUE {
                return Err(StorageError::TooLarge {
                    path: path.to_owned(),
                    size: value.len(),
                });
            }
            let mut inner = self.inner.lock();
            let (counter, map) = &mut *inner;
            if !holds(precondition, map.get(path)) {
                return Err(StorageError::Conflict(path.to_owned()));
            }
            *counter += 1;
            map.insert(
                path.to_owned(),
                Stored {
                    value: value.into(),
                    version: *counter,
                },
            );
            Ok(*counter)
        })();
        std::future::ready(result).boxed()
    }

    fn delete<'a>(
        &'a self,
        path: &'a str,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        let result = (|| {
            check_path(path)?;
            let mut inner = self.inner.lock();
            let map = &mut inner.1;
            match (precondition, map.get(path)) {
                (_, None) if precondition != Precondition::Absent => Ok(()),
                (p, current) if holds(p, current) => {
                    map.remove(path);
                    Ok(())
                }
                _ => Err(StorageError::Conflict(path.to_owned())),
            }
        })();
        std::future::ready(result).boxed()
    }

    fn paths<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        let inner = self.inner.lock();
        let paths = inner
            .1
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        std::future::ready(Ok(paths)).boxed()
    }
}
