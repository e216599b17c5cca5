//! Stacks without frame pointers: .eh_frame rules for the kernel's unwinder.

pub mod table;
