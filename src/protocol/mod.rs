//! The wire protocol: the JSON envelope, error and close codes, subscription filters and topic
//! naming rules. Nothing here does I/O.

pub mod codes;
pub mod envelope;
pub mod filter;
pub mod topic;
