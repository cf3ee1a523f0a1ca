//! Helpers for the end-to-end tests: the daemon process, a vhost-user
//! frontend with its guest RAM, a split-ring driver and frame builders.

#![allow(dead_code)]

pub mod driver;
pub mod frontend;
pub mod net;
pub mod process;

use std::time::Duration;

/// Bound on every wait. Generous: the tests run on a loaded machine, and
/// every wait polls, so the bound costs nothing when things work.
pub const TIMEOUT: Duration = Duration::from_secs(10);
