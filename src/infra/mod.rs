//! Infrastructure the components share: the ways out of the process.
//!
//! - [`redis`]: the one Redis layer (settings, pool, timed call, key
//!   layout, scripts, health) that the broker, the store and presence use.

pub mod redis;
