//! A mount's named entries (a secrets mount's roles and database connections, the
//! Kubernetes auth roles): JSON through the barrier at `<prefix><name>`. A name that is not a valid storage
//! name names nothing here: reading it finds nothing and deleting it deletes nothing.
//! Writing one is for the mount to refuse, since only it can say what was wrong.

use crate::store::{
    logical::{Logical, LogicalError, Versioned},
    storage::{Precondition, valid_name},
};
use serde::{Serialize, de::DeserializeOwned};

#[derive(Clone)]
pub struct Named {
    logical: Logical,
    /// Ends in `/` (a secrets mount's: `logical/<mount>/<kind>/`).
    prefix: String,
}

impl Named {
    /// A secrets mount's entries of one kind, at `logical/<mount>/<kind>/<name>`.
    pub fn new(logical: Logical, mount: &str, kind: &str) -> Self {
        Self::at(logical, format!("logical/{mount}/{kind}/"))
    }

    /// Entries at `<prefix><name>`.
    pub fn at(logical: Logical, prefix: String) -> Self {
        Self { logical, prefix }
    }

    /// Where `name` is stored.
    pub fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub async fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<Versioned<T>>, LogicalError> {
        if !valid_name(name) {
            return Ok(None);
        }
        self.logical.get::<T>(&self.path(name)).await
    }

    /// Stores `value` under `name`, which the caller has checked.
    pub async fn put<T: Serialize>(&self, name: &str, value: &T) -> Result<(), LogicalError> {
        self.logical
            .put(&self.path(name), value, Precondition::None)
            .await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), LogicalError> {
        if valid_name(name) {
            self.logical.delete(&self.path(name), Precondition::None).await?;
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<String>, LogicalError> {
        self.logical.list(&self.prefix).await
    }
}
