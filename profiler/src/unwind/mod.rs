//! Stacks without frame pointers: .eh_frame rules for the kernel's unwinder.

pub mod kernel;
pub mod table;

pub use kernel::{ObjectWalk, UnwindError, UnwindMode, Unwinder};
