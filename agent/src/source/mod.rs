//! Sources that fill the store.

pub mod file;
