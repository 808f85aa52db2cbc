//! Looking after a store over time: `gc` removes what no project, instance or running
//! process needs; `verify` finds damaged entries and repairs them.
//!
//! This floor sits above `run` (it reads instance records) and `build`, below `cli`.

pub mod gc;
pub mod verify;
