//! Realising a build plan: fetched and imported images, Debian images from a mirror, farm's
//! tiny image, and platform layers built in a VM, each committed to the store.

mod context;
pub mod debian_image;
pub mod layer;
pub mod missing;
mod produce;
pub mod pull;
pub mod realise;
pub mod reproduce;
pub mod substitution;
pub mod tiny_image;
pub mod tool_log;
pub mod tools;
